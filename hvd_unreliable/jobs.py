"""Slurm job scripts rendered from the cluster layouts in conf/cluster/ (a layout is written once).

    python -m hvd_unreliable.jobs render cluster=slurm_gpu_16 algorithm=rps network.arrival_rate=0.9
    python -m hvd_unreliable.jobs render --launcher mpirun cluster=slurm_gpu_16 model=resnet110 data=cifar10 ...
    python -m hvd_unreliable.jobs render --submit network.arrival_rate=0.6,0.8,0.9 algorithm=rps,allreduce

Overrides are the training app's. Sweeps in Hydra's grammar (``a=1,2``, ``range(...)``,
``choice(...)``) make an array job, one task per combination, every one validated first.
The script goes to ``--out`` (default ``jobs/rendered/<job>.sbatch``); ``--submit`` hands it to
``sbatch``. Templates: ``jobs/srun.sbatch`` (``srun --mpi=pmix``, any MPI) and
``jobs/mpirun.sbatch`` (Open MPI's ``mpirun`` inside the allocation). Both requeue on SIGUSR1
after a checkpoint.
"""
from __future__ import annotations

import argparse
import itertools
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from string import Template
from typing import List

from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import TrainConfig, validate
from .errors import ConfigError, LaunchError

ROOT = Path(__file__).resolve().parent.parent


def expand(overrides: List[str]) -> List[List[str]]:
    """The jobs of a sweep over ``overrides``, each a list of overrides, in the order Hydra's basic
    sweeper runs them. Hydra's override grammar: ``a=1,2``, ``choice(...)``, ``range(...)``;
    quoted values keep their commas."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if not o.is_sweep_override():
            axes.append([o.input_line])
        elif o.is_discrete_sweep():
            axes.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            raise ConfigError("override", o.input_line, "a single value or a list, choice() or range() sweep")
    return [list(combo) for combo in itertools.product(*axes)]


def compose(overrides: List[str], config_name: str = "config") -> TrainConfig:
    """The validated training config of one job. Inside the training app (its sweep check) Hydra is
    already initialised with the app's config path; elsewhere the repository's ``conf/`` is used."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from . import train  # noqa: F401  (registers the schema and resolvers)

    if GlobalHydra.instance().is_initialized():
        cfg: TrainConfig = OmegaConf.to_object(hydra_compose(config_name, overrides=overrides))
    else:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = OmegaConf.to_object(hydra_compose(config_name, overrides=overrides))
    validate(cfg, cfg.cluster.world_size)
    return cfg


def render(overrides: List[str], launcher: str = "srun", checkpoint_every: int = 500) -> str:
    if launcher not in ("srun", "mpirun"):
        raise ConfigError("--launcher", launcher, "'srun' or 'mpirun'")
    tasks = expand(overrides)
    cfgs = [compose(t) for t in tasks]  # every task validated before anything is written
    c = cfgs[0].cluster
    if any(x.cluster != c for x in cfgs):
        raise ConfigError("cluster", "varies across the sweep", "one cluster layout per job script")
    optional = ""
    if c.gpus_per_node:
        optional += f"#SBATCH --gpus-per-node={c.gpus_per_node}\n"
    for key in ("partition", "account"):
        if getattr(c, key):
            optional += f"#SBATCH --{key}={getattr(c, key)}\n"
    optional += "".join(f"#SBATCH {arg}\n" for arg in c.sbatch_args)
    common = [o for o in overrides if all(o in t for t in tasks)]  # the same in every job
    varying = [[o for o in t if o not in common] for t in tasks]
    if len(tasks) > 1:
        optional += f"#SBATCH --array=0-{len(tasks) - 1}\n"
        cases = "".join(f"  {i}) TASK_OVERRIDES=({' '.join(shlex.quote(o) for o in v)}) ;;\n" for i, v in enumerate(varying))
        array = (f'case "${{SLURM_ARRAY_TASK_ID}}" in  # this array task\'s overrides\n{cases}'
                 f'  *) echo "no array task ${{SLURM_ARRAY_TASK_ID}} in this script" >&2; exit 2 ;;\nesac')
    else:
        array = "TASK_OVERRIDES=()"
    template = Template((ROOT / "jobs" / f"{launcher}.sbatch").read_text())
    return template.substitute(
        cluster=c.name, job_name=f"hvdu-{c.name}", nodes=c.nodes, ranks_per_node=c.ranks_per_node,
        cpus_per_task=c.cpus_per_task, time=c.time, optional_directives=optional, log_dir="outputs/slurm/logs",
        workdir=shlex.quote(str(ROOT)), python=shlex.quote(sys.executable), array_overrides=array,
        overrides=" ".join(shlex.quote(o) for o in common), checkpoint_every=checkpoint_every)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="write an sbatch script")
    r.add_argument("overrides", nargs="*", help="training overrides, e.g. cluster=slurm_gpu_16 algorithm=rps")
    r.add_argument("--launcher", default="srun", help="srun (srun --mpi=pmix) or mpirun")
    r.add_argument("--checkpoint-every", type=int, default=500, help="checkpoint interval in steps")
    r.add_argument("--out", type=Path, help="where the script goes (default jobs/rendered/<name>.sbatch)")
    r.add_argument("--submit", action="store_true", help="submit it with sbatch")
    args = ap.parse_args(argv)
    try:
        return _render(args)
    except (ConfigError, LaunchError, HydraException, OmegaConfBaseException) as e:  # the message says it all
        cause = f" ({e.__cause__})" if e.__cause__ is not None else ""
        print(f"hvd_unreliable.jobs: {type(e).__name__}: {e}{cause}", file=sys.stderr, flush=True)
        return 1 if isinstance(e, LaunchError) else 2


def _render(args) -> int:
    script = render(args.overrides, args.launcher, args.checkpoint_every)
    out = args.out or ROOT / "jobs" / "rendered" / f"{'_'.join(o.replace('=', '-') for o in args.overrides) or 'default'}.sbatch"
    out.parent.mkdir(parents=True, exist_ok=True)
    (ROOT / "outputs" / "slurm" / "logs").mkdir(parents=True, exist_ok=True)
    out.write_text(script)
    out.chmod(0o755)
    print(f"wrote {out}")
    if args.submit:
        if shutil.which("sbatch") is None:
            raise LaunchError("--submit needs sbatch on PATH (run on a Slurm login node)")
        return subprocess.run(["sbatch", str(out)], check=False).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())

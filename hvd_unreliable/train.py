"""Entry point: ``python -m hvd_unreliable.train [overrides]`` (console script ``hvdu-train``).

From a plain shell, this process is Hydra's job: it validates the config, then starts the ranks
with ``mpirun -np <cluster.nodes * cluster.ranks_per_node>`` (``srun --mpi=pmix`` when
``cluster.launcher=srun``), each rank re-running this module with the same overrides and
``hydra.run.dir`` pinned to the job's directory. A sweep (``-m``) therefore runs one mpirun per
job, one directory per job. Started by mpirun/srun directly (or by hydra-submitit-launcher on
Slurm), the process is a rank and trains. Only rank 0 writes config, metrics and plots.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .config import TrainConfig, register_configs, sbatch_options, slurm_minutes, validate
from .errors import ConfigError, LaunchError
from .launch import launcher_env, mpirun_command, rank_from_env, run_id, running_as_rank, srun_command

log = logging.getLogger(__name__)

OmegaConf.register_new_resolver("hvdu_run_id", lambda: run_id(), replace=True)
OmegaConf.register_new_resolver("hvdu_on_rank0", lambda value: value if rank_from_env() == 0 else None, replace=True)
OmegaConf.register_new_resolver("hvdu_rank_suffix", lambda: f".rank{rank_from_env()}" if running_as_rank() else "",
                                replace=True)
# conf/hydra/launcher/submitit_pmix.yaml: the time limit and extra options of the cluster layout
OmegaConf.register_new_resolver("hvdu_minutes", slurm_minutes, replace=True)
OmegaConf.register_new_resolver("hvdu_sbatch_options", lambda args: sbatch_options(list(args)), replace=True)
register_configs()


class CheckSweep(Callback):
    """``-m``: every job of the sweep is composed and validated before the first one starts, so
    that a bad value in the last job does not surface after the others have run (conf/config.yaml
    registers it; hydra-submitit-launcher calls it on the submitting machine)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from .jobs import compose, expand

        for i, task in enumerate(expand(list(config.hydra.overrides.task))):
            try:
                compose(task, config.hydra.job.config_name)
            except ConfigError as e:
                print(f"hvd_unreliable.train: ConfigError: {e} (sweep job #{i}: {' '.join(task)})",
                      file=sys.stderr, flush=True)
                sys.exit(2)


def launch_ranks(cfg: TrainConfig, out_dir: Path) -> int:
    """Start the job's ranks on this job's directory and wait for them."""
    validate(cfg, cfg.cluster.world_size)  # fail here, before starting any rank
    from .training.checkpoint import check_resumable

    check_resumable(cfg, out_dir)
    hc = HydraConfig.get()
    rank_args = [sys.executable, "-m", "hvd_unreliable.train", f"--config-name={hc.job.config_name}",
                 *hc.overrides.task, f"hydra.run.dir={out_dir}"]
    np = cfg.cluster.world_size
    if cfg.cluster.launcher == "srun":
        cmd = srun_command(np) + rank_args
    elif cfg.cluster.launcher == "mpirun":
        cmd = mpirun_command(np, cfg.cluster.mpirun_args) + rank_args
    else:
        raise ConfigError("cluster.launcher", cfg.cluster.launcher, "'mpirun' or 'srun'")
    log.info("launching: %s", " ".join(cmd))
    proc = subprocess.run(cmd, env=launcher_env())
    if proc.returncode != 0:
        raise LaunchError(f"the {np} ranks of {out_dir} exited with status {proc.returncode} (see the output above)")
    return proc.returncode


def run_rank(cfg: TrainConfig, out_dir: Path):
    """Train as one rank. An error on any rank takes the whole job down (MPI_Abort): the other
    ranks would otherwise wait for it until their timeouts, then hang in MPI_Finalize. So does a
    data-parallel step that makes no progress for ``network.timeout`` seconds (a watchdog: the
    blocking collectives beside the lossy transport have no timeout of their own; the
    parameter-server variants talk through the transport only)."""
    from mpi4py import MPI

    from .config import PS_ALGORITHMS
    from .integration.context import check_launch

    try:
        check_launch(MPI.COMM_WORLD.Get_size())  # one MPI world at all, before the layout is compared with it
        if cfg.algorithm.name in PS_ALGORITHMS:
            from .training.ps_loop import train_ps

            train_ps(cfg, out_dir)
            return None
        from .integration.watchdog import Watchdog
        from .training.loop import train

        with Watchdog(cfg.network.timeout, key="network.timeout") as dog:  # a step stuck that long ends the job
            return train(cfg, out_dir, dog.progress)["final"].get("train_loss")
    except (ConfigError, LaunchError):
        raise  # raised on every rank before any communication: a normal exit
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        if MPI.COMM_WORLD.Get_size() > 1:
            MPI.COMM_WORLD.Abort(1)
        raise


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(dcfg: DictConfig):
    cfg: TrainConfig = OmegaConf.to_object(dcfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if running_as_rank():
            return run_rank(cfg, out_dir)
        launch_ranks(cfg, out_dir)
    except (ConfigError, LaunchError) as e:  # the message says it all: no traceback
        print(f"hvd_unreliable.train: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    return None


if __name__ == "__main__":
    main()

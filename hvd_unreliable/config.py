"""Typed configuration: these dataclasses are the Hydra schema (registered in Hydra's ConfigStore),
so a typo in a key fails at composition, and :func:`validate` checks values before any rank talks.

``conf/`` holds the YAML groups built on them: ``cluster/``, ``network/``, ``algorithm/``,
``model/``, ``data/``, ``optim/``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from .errors import (ConfigError, check_choice, check_nonnegative, check_num_servers, check_packet_bytes, check_positive,
                     check_probability)
from .faults.delay import DelayConfig, DelayModel
from .faults.loss import LossConfig, LossModel, build_loss_model

ALGORITHMS = ("reliable", "allreduce", "rps")
PS_ALGORITHMS = ("k_sync", "k_batch_sync", "k_async", "k_batch_async")
MODELS = ("resnet20", "resnet56", "resnet110", "cnn", "mlp", "logreg")
DATASETS = ("digits", "cifar10", "synthetic")
PARTITIONS = ("iid", "label_skew")


@dataclass
class ClusterConfig:
    """Where the ranks run. ``lossy_links``: ``all`` (every link uses ``network.loss``) or
    ``inter_node`` (links inside a node are reliable, links across nodes use ``network.loss``)."""

    name: str = "local_cpu_4"
    nodes: int = 1
    ranks_per_node: int = 4
    device: str = "cpu"
    lossy_links: str = "all"
    launcher: str = "mpirun"  # how a plain shell starts the ranks: mpirun (srun under Slurm via submitit)
    mpirun_args: List[str] = field(default_factory=list)
    # Slurm fields used by the job renderer
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "01:00:00"
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    sbatch_args: List[str] = field(default_factory=list)  # more #SBATCH options, e.g. --qos=high

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


@dataclass
class NetworkConfig:
    """The simulated network. ``arrival_rate`` (= 1 - p, the papers' wording) feeds ``loss``."""

    name: str = "reliable"
    arrival_rate: float = 1.0
    loss: LossConfig = field(default_factory=LossConfig)
    delay: DelayConfig = field(default_factory=DelayConfig)
    packet_bytes: Optional[int] = None
    timeout: float = 300.0  # s: an exchange waiting for a peer, and a training step, give up after it


@dataclass
class AlgorithmConfig:
    """``name``: reliable | allreduce | rps (Paper A), or a parameter-server variant (Paper B):
    k_sync | k_batch_sync | k_async | k_batch_async, with ``k`` gradients per update,
    ``lr_rule`` fixed | staleness | inverse (``lr_c``, ``lr_max`` for staleness; the base rate
    is ``optim.lr``), AdaSync when ``adasync_interval`` > 0 seconds, ``updates`` to run and a
    loss evaluation every ``eval_every`` updates."""

    name: str = "rps"
    num_servers: Optional[int] = None
    k: int = 2
    lr_rule: str = "fixed"
    lr_c: float = 0.01
    lr_max: float = 0.1
    adasync_interval: float = 0.0
    updates: int = 200
    eval_every: int = 10


@dataclass
class ModelConfig:
    name: str = "cnn"
    hidden: List[int] = field(default_factory=lambda: [128])


@dataclass
class DataConfig:
    name: str = "digits"
    root: Optional[str] = None
    partition: str = "iid"
    skew_alpha: float = 0.5
    test_fraction: float = 0.2
    # synthetic
    num_samples: int = 4000
    shape: List[int] = field(default_factory=lambda: [3, 32, 32])
    num_classes: int = 10
    noise: float = 1.0


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 5


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0 = no checkpoints
    resume: bool = True


@dataclass
class TrainConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = 0
    eval_every_steps: int = 0  # 0 = once per epoch
    progress: bool = True


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, node in (("cluster", ClusterConfig), ("network", NetworkConfig), ("algorithm", AlgorithmConfig),
                        ("model", ModelConfig), ("data", DataConfig), ("optim", OptimConfig)):
        cs.store(group=group, name=f"{group}_schema", node=node)


def build_loss(cfg: TrainConfig, world_size: int) -> LossModel:
    """The loss model of ``network``, applied to every link or to inter-node links only."""
    net, cl = cfg.network, cfg.cluster
    check_probability("network.arrival_rate", net.arrival_rate)
    if net.arrival_rate != 1.0 and net.loss.arrival_rate != net.arrival_rate:
        if net.loss.kind == "bernoulli" and net.loss.arrival_rate is not None:  # the copy was overridden
            raise ConfigError("network.loss.arrival_rate", net.loss.arrival_rate,
                              f"network.arrival_rate ({net.arrival_rate}), which it copies: set network.arrival_rate "
                              "alone")
        raise ConfigError("network.arrival_rate", net.arrival_rate,
                          f"1.0 with this network: its loss model (network.loss.kind={net.loss.kind}) does not "
                          f"read it; network=bernoulli does")
    check_choice("cluster.lossy_links", cl.lossy_links, ("all", "inter_node"))
    model = build_loss_model(net.loss, world_size, cl.ranks_per_node, key="network.loss")
    if cl.lossy_links == "inter_node":
        from .faults.loss import Bernoulli, PerLink

        model = PerLink.from_layout(world_size, cl.ranks_per_node, Bernoulli(0.0), model)
    return model


def slurm_minutes(time: str, key: str = "cluster.time") -> int:
    """Minutes of a Slurm time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``), rounded up: hydra-submitit-launcher takes the limit in minutes."""
    accepted = "a Slurm time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
    days, _, rest = str(time).rpartition("-")
    parts = rest.split(":")
    if not (days == "" or days.isdigit()) or not all(p.isdigit() for p in parts) or len(parts) > 3:
        raise ConfigError(key, time, accepted)
    nums = [int(p) for p in parts]
    if days:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + sum(n * u for n, u in zip(nums, (3600, 60, 1)))
    else:  # MM, MM:SS or HH:MM:SS
        seconds = sum(n * u for n, u in zip(nums, {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(nums)]))
    if seconds <= 0:
        raise ConfigError(key, time, accepted + ", longer than 0")
    return -(-seconds // 60)


def sbatch_options(args, key: str = "cluster.sbatch_args") -> dict:
    """``["--qos=high", "--exclusive"]`` as hydra-submitit-launcher's ``additional_parameters``
    (``{"qos": "high", "exclusive": True}``); each must be one long option."""
    out = {}
    for arg in args:
        name, eq, value = str(arg).partition("=")
        if not name.startswith("--") or len(name) < 3 or any(c.isspace() for c in name) or "\n" in str(arg):
            raise ConfigError(key, arg, "sbatch long options such as --qos=high or --exclusive, one per item")
        out[name[2:]] = value if eq else True
    return out


def validate(cfg: TrainConfig, world_size: int) -> None:
    """Every check that can fail, run on every rank before the first message."""
    cl = cfg.cluster
    for key in ("nodes", "ranks_per_node"):
        if getattr(cl, key) < 1:
            raise ConfigError(f"cluster.{key}", getattr(cl, key), "an integer >= 1")
    if cl.world_size != world_size:
        raise ConfigError("cluster", f"{cl.nodes} nodes x {cl.ranks_per_node} ranks = {cl.world_size}",
                          f"the {world_size} ranks that were launched (fix the layout or the -np of the launch)")
    check_choice("cluster.device", cl.device, ("cpu", "cuda"))
    slurm_minutes(cl.time)
    sbatch_options(cl.sbatch_args)
    check_choice("algorithm.name", cfg.algorithm.name, ALGORITHMS + PS_ALGORITHMS)
    if cfg.algorithm.name in PS_ALGORITHMS:
        _validate_ps(cfg, world_size)
    check_num_servers(cfg.algorithm.num_servers, world_size, "algorithm.num_servers", "null")
    build_loss(cfg, world_size)
    check_packet_bytes("network.packet_bytes", cfg.network.packet_bytes)
    DelayModel(cfg.network.delay, key="network.delay")
    check_positive("network.timeout", cfg.network.timeout)
    check_choice("model.name", cfg.model.name, MODELS)
    if cfg.model.name == "mlp" and not all(isinstance(h, int) and h >= 1 for h in cfg.model.hidden):
        raise ConfigError("model.hidden", list(cfg.model.hidden), "a list of layer widths >= 1")
    _validate_data(cfg.data)
    check_choice("optim.name", cfg.optim.name, ("sgd", "adam"))
    check_positive("optim.lr", cfg.optim.lr)
    for key in ("batch_size", "epochs"):
        if getattr(cfg.optim, key) < 1:
            raise ConfigError(f"optim.{key}", getattr(cfg.optim, key), "an integer >= 1")
    if cfg.checkpoint.every_steps < 0:
        raise ConfigError("checkpoint.every_steps", cfg.checkpoint.every_steps, "0 (off) or a number of steps")
    if cfg.eval_every_steps < 0:
        raise ConfigError("eval_every_steps", cfg.eval_every_steps, "0 (once per epoch) or a number of steps")


def _validate_data(d: DataConfig) -> None:
    """What the ranks would otherwise find out only when they load the data."""
    check_choice("data.name", d.name, DATASETS)
    check_choice("data.partition", d.partition, PARTITIONS)
    if d.partition == "label_skew":
        check_positive("data.skew_alpha", d.skew_alpha)
    if d.name == "cifar10":
        return  # its files fix the test split and the shapes
    if isinstance(d.test_fraction, bool) or not 0 < d.test_fraction < 1:
        raise ConfigError("data.test_fraction", d.test_fraction, "a fraction in (0, 1): the share held out for testing")
    if d.name == "synthetic":
        if d.num_samples < 2:
            raise ConfigError("data.num_samples", d.num_samples, "an integer >= 2")
        if d.num_classes < 2:
            raise ConfigError("data.num_classes", d.num_classes, "an integer >= 2")
        if len(d.shape) != 3 or not all(isinstance(x, int) and x >= 1 for x in d.shape):
            raise ConfigError("data.shape", list(d.shape), "[channels, height, width], each >= 1")
        check_nonnegative("data.noise", d.noise)


def _validate_ps(cfg: TrainConfig, world_size: int) -> None:
    a, name = cfg.algorithm, cfg.algorithm.name
    # What the parameter server would silently ignore: it applies Paper B's plain SGD update at
    # optim.lr (optim.momentum is not read), evaluates every algorithm.eval_every updates, and
    # has no RPS servers.
    for key, value, default, accepted in (
            ("optim.name", cfg.optim.name, "sgd", f"sgd with algorithm={name} (the parameter server applies "
                                                  "Paper B's plain SGD update at optim.lr)"),
            ("optim.weight_decay", cfg.optim.weight_decay, 0.0, f"0 with algorithm={name} (Paper B's update has none)"),
            ("algorithm.num_servers", a.num_servers, None, f"null with algorithm={name} (RPS's servers; rank 0 "
                                                           "is the parameter server)"),
            ("eval_every_steps", cfg.eval_every_steps, 0, f"0 with algorithm={name}; set algorithm.eval_every "
                                                          "(updates between evaluations)")):
        if value != default:
            raise ConfigError(key, value, accepted)
    learners = world_size - 1
    if learners < 1:
        raise ConfigError("cluster", f"{world_size} rank(s)", "at least 2 ranks (one parameter server, one learner)")
    if not 1 <= a.k <= learners:
        raise ConfigError("algorithm.k", a.k, f"an integer in [1, {learners}] (the number of learners: ranks - 1)")
    check_choice("algorithm.lr_rule", a.lr_rule, ("fixed", "staleness", "inverse"))
    for key in ("lr_c", "lr_max"):
        check_positive(f"algorithm.{key}", getattr(a, key))
    if a.adasync_interval < 0:
        raise ConfigError("algorithm.adasync_interval", a.adasync_interval, "0 (fixed K) or seconds > 0")
    for key in ("updates", "eval_every"):
        if getattr(a, key) < 1:
            raise ConfigError(f"algorithm.{key}", getattr(a, key), "an integer >= 1")

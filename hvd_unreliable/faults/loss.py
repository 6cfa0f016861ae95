"""Message- and packet-loss models: is this message (or packet) lost?

Pure and seeded: no MPI here. Each model answers :meth:`LossModel.decide` for one directed link
``src -> dst`` in one exchange, returning a boolean array (``True`` = lost) with one entry per
packet (a whole message is one packet). Draws are hashes of the decision's coordinates,
so both ends of a link compute identical answers.

Decisions are batched: :meth:`LossModel.decide_links` answers for every link of one exchange
in one vectorised pass (draws from :mod:`hvd_unreliable.faults.keys`), and
:meth:`LossModel.message_decider` answers whole-message decisions for one layout's links step
after step (the transport keeps one per layout, phase and call; Bernoulli's decides in C
where ``_decide.c`` is built, else :data:`AHEAD` steps at a time with NumPy).

Models, named as in Linux netem (``tc qdisc ... netem loss ...``):

* :class:`Bernoulli` -- ``random P``: every packet lost independently with probability ``p``
  (Paper A's model; ``arrival_rate = 1 - p`` in the papers' wording).
* :class:`GilbertElliott` -- ``gemodel p [r [1-h [1-k]]]``: a two-state Markov chain per
  directed link (Good/Bad). Per packet, first a state-transition draw (G->B with ``p``, B->G with
  ``r``), then the loss draw in the state the packet arrived in (lost with ``1-k`` in Good,
  ``1-h`` in Bad). Defaults ``r = 1-p``, ``1-h = 1``, ``1-k = 0``. The chain state of each link
  persists across exchanges and steps, advanced identically at sender and receiver.
* :class:`PerLink` -- one model per directed link: a matrix of loss probabilities, or a rule
  derived from a cluster layout (links inside a node use one model, across nodes another).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError, check_choice, check_probability
from .keys import link_keys, message_hash_inputs, message_uniforms_ahead, uniforms


def _c_lost_links() -> Optional[Callable]:
    """``_decide.lost_links`` (a Bernoulli step's decisions in C, built by ``pip install``), or
    ``None`` where it is not built or ``HVDU_NATIVE=0``: the NumPy windows then decide."""
    if os.environ.get("HVDU_NATIVE", "1") == "0":
        return None
    try:
        from ._decide import lost_links
    except ImportError:
        return None
    return lost_links


_LOST_LINKS = _c_lost_links()


def _split(flat: np.ndarray, counts: Sequence[int]) -> List[np.ndarray]:
    ends = list(accumulate(counts))
    return [flat[e - c:e] for c, e in zip(counts, ends)]


class LossModel:
    """Base class. A model of its own implements :meth:`decide_links` (draws from
    :mod:`hvd_unreliable.faults.keys`, so that both ends of a link get the same answer) and
    :attr:`mean_loss`; :meth:`lost_messages` and :meth:`message_decider` follow from
    :meth:`decide_links` and are worth overriding only for speed (as :class:`Bernoulli` does).
    A model with state across steps (as :class:`GilbertElliott`'s chains) saves it in
    :meth:`state_dict` for checkpoints; one that cannot serve a world size says so in
    :meth:`check_world`, which the transport calls on every rank before any communication."""

    never_loses = False  # True lets the transport skip deciding altogether

    def decide_links(self, step: int, phase: str, srcs: Sequence[int], dsts: Sequence[int],
                     counts: Sequence[int], seed: int = 0, call: int = 0) -> List[np.ndarray]:
        """Per-packet decisions (True = lost) for links ``srcs[i] -> dsts[i]`` with ``counts[i]`` packets."""
        raise NotImplementedError

    def lost_messages(self, step: int, phase: str, srcs: Sequence[int], dsts: Sequence[int],
                      seed: int = 0, call: int = 0) -> List[bool]:
        """Whole-message decisions: :meth:`decide_links` with one packet per link, as plain bools."""
        return [bool(d[0]) for d in self.decide_links(step, phase, srcs, dsts, [1] * len(srcs), seed, call)]

    def message_decider(self, phase: str, srcs: Sequence[int], dsts: Sequence[int], seed: int = 0,
                        call: int = 0) -> Callable[[int], Sequence[bool]]:
        """:meth:`lost_messages` for one fixed set of links, phase, seed and call, as a function of
        the step: what the transport asks in every exchange of a layout. Models that can decide
        ahead answer faster through it."""
        return lambda step: self.lost_messages(step, phase, srcs, dsts, seed, call)

    def decide(self, step: int, phase: str, src: int, dst: int, num_packets: int,
               seed: int = 0, call: int = 0) -> np.ndarray:
        """Decisions for one link (the same as its entry in :meth:`decide_links`)."""
        return self.decide_links(step, phase, [src], [dst], [num_packets], seed, call)[0]

    @property
    def mean_loss(self) -> float:
        """The long-run fraction of packets lost (for reports and statistical tests)."""
        raise NotImplementedError

    def check_world(self, world_size: int, key: str = "loss") -> None:
        """Raise :class:`ConfigError` (naming ``key``) when the model cannot serve ``world_size`` ranks."""

    # Chain state, saved in checkpoints; stateless models have none.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# Steps of whole-message decisions a Bernoulli model computes at once with NumPy (without the C
# decider). A batch of one exchange's few links costs mostly NumPy's fixed cost per operation, so
# more steps a batch cost less a step (`decide_s` in bench/bench_transport.py).
AHEAD = 1024


@dataclass
class Bernoulli(LossModel):
    """Each packet lost independently with probability ``p`` (netem ``loss random P``).

    Whole-message decisions (:meth:`message_decider`, :meth:`lost_messages`) come from C, one
    step per call (``_decide.c``), where the extension is built; else they are computed with
    NumPy for :data:`AHEAD` steps at a time (steps ``k * AHEAD`` to ``(k + 1) * AHEAD - 1``) per
    phase, call and set of links, and handed out step by step. Both hand out one shared tuple
    per pattern of losses, and both give the same values as one step at a time, at a fraction of
    its cost per exchange."""

    p: float = 0.0
    _deciders: Dict[tuple, Callable] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.p = check_probability("loss.p", self.p)
        self.never_loses = self.p == 0.0

    def decide_links(self, step, phase, srcs, dsts, counts, seed=0, call=0):
        if self.p in (0.0, 1.0) or not len(counts):
            return [np.full(c, self.p == 1.0) for c in counts]
        u = uniforms(link_keys(seed, step, phase, call, srcs, dsts), counts)
        return _split(u < self.p, counts)

    def lost_messages(self, step, phase, srcs, dsts, seed=0, call=0):
        key = (seed, phase, call, tuple(srcs), tuple(dsts))
        decide = self._deciders.get(key)
        if decide is None:
            if len(self._deciders) >= 64:  # (a training step has a few phases and calls: a handful of keys)
                self._deciders.clear()
            decide = self._deciders[key] = self.message_decider(phase, key[3], key[4], seed, call)
        return list(decide(step))

    def message_decider(self, phase, srcs, dsts, seed=0, call=0):
        srcs, dsts, p, each_step = tuple(srcs), tuple(dsts), self.p, super().lost_messages  # (one step, vectorised)
        if p in (0.0, 1.0):
            every_step = (p == 1.0,) * len(srcs)  # the same answer at every step
            return lambda step: every_step
        if len(srcs) > 64:
            return lambda step: each_step(step, phase, srcs, dsts, seed, call)
        if _LOST_LINKS is not None:
            return partial(_LOST_LINKS, *message_hash_inputs(seed, phase, call, srcs, dsts), p, {})
        bits = np.uint64(1) << np.arange(len(srcs), dtype=np.uint64)  # link i: bit i of a step's mask
        window, rows, patterns = None, (), {}  # patterns: mask -> its tuple, made once

        def pattern(mask: int) -> tuple:
            got = patterns[mask] = tuple(bool(mask >> i & 1) for i in range(len(bits)))
            return got

        def lost(step: int) -> tuple:
            nonlocal window, rows
            if step // AHEAD != window:  # (aligned: callers at other steps of the same exchange agree)
                if step < 0:
                    return tuple(each_step(step, phase, srcs, dsts, seed, call))
                window = step // AHEAD
                u = message_uniforms_ahead(seed, window * AHEAD, AHEAD, phase, call, srcs, dsts)
                if len(patterns) > 4096:
                    patterns.clear()
                # The steps share the tuples of the few patterns that occur: a new tuple per step
                # set off Python's full garbage collection, a pause of 0.22-0.29 s with torch
                # loaded, every rank waiting for the one collecting (python
                # bench/bench_long_run.py --against a2ef892).
                rows = [patterns.get(m) or pattern(m) for m in ((u < p) * bits).sum(axis=1).tolist()]
            return rows[step % AHEAD]

        return lost

    @property
    def mean_loss(self) -> float:
        return self.p


@dataclass
class GilbertElliott(LossModel):
    """netem ``loss gemodel p r 1-h 1-k``; all four are probabilities in [0, 1].

    ``p``: Good -> Bad transition; ``r``: Bad -> Good (default ``1 - p``);
    ``loss_bad`` = 1-h (default 1); ``loss_good`` = 1-k (default 0).
    """

    p: float = 0.0
    r: Optional[float] = None
    loss_bad: float = 1.0
    loss_good: float = 0.0
    _bad: Dict[Tuple[int, int], bool] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.p = check_probability("loss.gemodel.p", self.p)
        self.r = check_probability("loss.gemodel.r", 1.0 - self.p if self.r is None else self.r)
        self.loss_bad = check_probability("loss.gemodel.loss_bad", self.loss_bad)
        self.loss_good = check_probability("loss.gemodel.loss_good", self.loss_good)
        self.never_loses = self.loss_good == 0.0 and (self.p == 0.0 or self.loss_bad == 0.0)

    @property
    def pi_bad(self) -> float:
        """Stationary probability of the Bad state, p / (p + r)."""
        return self.p / (self.p + self.r) if self.p + self.r > 0 else 0.0

    @property
    def mean_loss(self) -> float:
        return (1.0 - self.pi_bad) * self.loss_good + self.pi_bad * self.loss_bad

    def decide_links(self, step, phase, srcs, dsts, counts, seed=0, call=0):
        keys = link_keys(seed, step, phase, call, srcs, dsts)
        transitions = _split(uniforms(keys, counts, stream=1), counts)
        losses = _split(uniforms(keys, counts, stream=0), counts)
        out = []
        for src, dst, u, v in zip(srcs, dsts, transitions, losses):
            if u.size == 0:  # no packet: the chain does not move
                out.append(np.zeros(0, dtype=bool))
                continue
            bad = self._states(u, self._bad.get((src, dst), False))
            self._bad[(src, dst)] = bool(bad[-1])
            out.append(v < np.where(bad, self.loss_bad, self.loss_good))
        return out

    def _states(self, u: np.ndarray, bad: bool) -> np.ndarray:
        """Chain state of every packet after its transition draw, starting from ``bad``.

        Equivalent to the per-packet loop ``bad = (u[k] >= r) if bad else (u[k] < p)``, but
        jumps from one state change to the next with ``searchsorted``.
        """
        leave_good = np.flatnonzero(u < self.p)
        leave_bad = np.flatnonzero(u < self.r)
        states = np.empty(u.size, dtype=bool)
        pos = 0
        while pos < u.size:
            exits = leave_bad if bad else leave_good
            i = np.searchsorted(exits, pos)
            flip = int(exits[i]) if i < exits.size else u.size
            states[pos:flip] = bad
            bad, pos = not bad, flip
            if flip < u.size:
                states[flip] = bad
                pos = flip + 1
        return states

    def state_dict(self) -> dict:
        return {"bad": sorted([list(k) for k, v in self._bad.items() if v])}

    def load_state_dict(self, state: dict) -> None:
        self._bad = {tuple(k): True for k in state.get("bad", [])}


class PerLink(LossModel):
    """One loss model per directed link ``src -> dst``; asymmetric matrices are allowed."""

    def __init__(self, models: Sequence[Sequence[LossModel]]):
        self.models: List[List[LossModel]] = [list(row) for row in models]
        n = len(self.models)
        if n == 0 or any(len(row) != n for row in self.models):
            raise ConfigError("loss.matrix", [len(r) for r in self.models], "a square n x n matrix")
        self.never_loses = all(m.never_loses for row in self.models for m in row)

    @classmethod
    def from_matrix(cls, matrix, key: str = "loss.matrix") -> "PerLink":
        """``matrix[src][dst]`` is the loss probability of link src -> dst (diagonal ignored)."""
        try:
            m = np.asarray(matrix, dtype=float)
        except (TypeError, ValueError):  # ragged rows, words
            raise ConfigError(key, matrix, "a square n x n matrix of probabilities") from None
        if m.ndim != 2 or m.shape[0] != m.shape[1] or m.size == 0:
            raise ConfigError(key, np.asarray(matrix).tolist(), "a square n x n matrix of probabilities")
        bad = ~((m >= 0) & (m <= 1))
        if bad.any():
            i, j = map(int, np.argwhere(bad)[0])
            raise ConfigError(f"{key}[{i}][{j}]", float(m[i, j]), "a probability in [0, 1]")
        return cls([[Bernoulli(float(p)) for p in row] for row in m])

    @classmethod
    def from_layout(cls, world_size: int, ranks_per_node: int, intra: LossModel,
                    inter: LossModel) -> "PerLink":
        """Ranks ``r // ranks_per_node`` share a node: links inside it use ``intra``, others ``inter``."""
        if ranks_per_node < 1:
            raise ConfigError("cluster.ranks_per_node", ranks_per_node, "an integer >= 1")
        node = [r // ranks_per_node for r in range(world_size)]
        return cls([[intra if node[s] == node[d] else inter for d in range(world_size)]
                    for s in range(world_size)])

    def check_world(self, world_size: int, key: str = "loss") -> None:
        if len(self.models) != world_size:
            n = len(self.models)
            raise ConfigError(f"{key}.matrix", f"{n}x{n}", f"a {world_size}x{world_size} matrix (one row per rank)")

    def decide_links(self, step, phase, srcs, dsts, counts, seed=0, call=0):
        return [self.models[s][d].decide(step, phase, s, d, c, seed, call) for s, d, c in zip(srcs, dsts, counts)]

    def message_decider(self, phase, srcs, dsts, seed=0, call=0):
        """Each model decides its own links together, through its own decider (a layout rule has
        two models; Bernoulli's decide ahead): the same answers as :meth:`decide_links` link by link."""
        groups: Dict[int, Tuple[LossModel, List[int]]] = {}
        for i, (s, d) in enumerate(zip(srcs, dsts)):
            model = self.models[s][d]
            groups.setdefault(id(model), (model, []))[1].append(i)
        parts = [(links, model.message_decider(phase, [srcs[i] for i in links], [dsts[i] for i in links], seed, call))
                 for model, links in groups.values()]
        count = len(srcs)

        def lost(step: int) -> List[bool]:
            out = [False] * count
            for links, decide in parts:
                for i, gone in zip(links, decide(step)):
                    out[i] = gone
            return out

        return lost

    @property
    def mean_loss(self) -> float:
        n = len(self.models)
        off = [self.models[s][d].mean_loss for s in range(n) for d in range(n) if s != d]
        return float(np.mean(off)) if off else 0.0

    def _unique(self):
        seen = {}
        for row in self.models:
            for m in row:
                seen.setdefault(id(m), m)
        return list(seen.values())

    def state_dict(self) -> dict:
        return {"models": [m.state_dict() for m in self._unique()]}

    def load_state_dict(self, state: dict) -> None:
        for m, s in zip(self._unique(), state.get("models", [])):
            m.load_state_dict(s)


_PCT = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)(%?)"


def _prob(token: str, key: str) -> float:
    m = re.fullmatch(_PCT, token)
    if not m:
        raise ConfigError(key, token, "a probability such as 5% or 0.05")
    value = float(m.group(1)) / (100.0 if m.group(2) else 1.0)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(key, token, "a probability in [0, 1], such as 5% or 0.05")
    return value


def parse_loss_spec(spec: str, key: str = "network.loss.spec") -> LossModel:
    """Parse a netem-style loss spec.

    Accepted: ``none``; ``random P``; ``gemodel p [r [1-h [1-k]]]``; probabilities written as
    ``5%`` or ``0.05``. Example: ``parse_loss_spec("gemodel 1% 10% 70% 0.1%")``.
    """
    if not isinstance(spec, str):
        raise ConfigError(key, spec, "a string such as 'random 5%' or 'gemodel 1% 10% 70% 0.1%'")
    words = spec.replace("loss", " ").split() if spec.strip().startswith("loss") else spec.split()
    accepted = "'none', 'random P' or 'gemodel p [r [1-h [1-k]]]' (P like 5% or 0.05)"
    if not words:
        raise ConfigError(key, spec, accepted)
    kind, args = words[0].lower(), words[1:]
    if kind in ("none", "reliable") and not args:
        return Bernoulli(0.0)
    if kind == "random" and len(args) == 1:
        return Bernoulli(_prob(args[0], key))
    if kind == "gemodel" and 1 <= len(args) <= 4:
        names = ["p", "r", "loss_bad", "loss_good"]
        values = {n: _prob(a, f"{key} ({n})") for n, a in zip(names, args)}
        return GilbertElliott(**values)
    raise ConfigError(key, spec, accepted)


@dataclass
class LossConfig:
    """Structured config for a loss model (the Hydra schema of ``network.loss``).

    ``kind``: ``bernoulli``, ``gilbert_elliott``, ``per_link`` or ``spec``. For ``bernoulli``
    give ``p`` or ``arrival_rate`` (= 1 - p). For ``per_link`` give ``matrix`` (n x n
    probabilities), or ``intra_node``/``inter_node`` netem specs applied over the cluster layout.
    """

    kind: str = "bernoulli"
    p: Optional[float] = None
    arrival_rate: Optional[float] = None
    spec: Optional[str] = None
    gemodel_p: float = 0.0
    gemodel_r: Optional[float] = None
    gemodel_loss_bad: float = 1.0
    gemodel_loss_good: float = 0.0
    matrix: Optional[List[List[Any]]] = None  # Any: 0 and 1 as typed; from_matrix checks the values
    intra_node: str = "none"
    inter_node: str = "none"


LOSS_KINDS = ("bernoulli", "gilbert_elliott", "per_link", "spec")


def build_loss_model(cfg: LossConfig, world_size: Optional[int] = None, ranks_per_node: int = 1,
                     key: str = "network.loss") -> LossModel:
    """Turn a :class:`LossConfig` into a model, validating every field against ``world_size``."""
    check_choice(f"{key}.kind", cfg.kind, LOSS_KINDS)
    if cfg.kind == "bernoulli":
        if cfg.p is not None and cfg.arrival_rate is not None:
            if abs(cfg.p - (1.0 - cfg.arrival_rate)) > 1e-12:
                raise ConfigError(f"{key}.p", cfg.p, f"1 - arrival_rate = {1 - cfg.arrival_rate:.6g} (or give only one)")
        if cfg.arrival_rate is not None:
            p = 1.0 - check_probability(f"{key}.arrival_rate", cfg.arrival_rate)
        else:
            p = check_probability(f"{key}.p", 0.0 if cfg.p is None else cfg.p)
        model: LossModel = Bernoulli(p)
    elif cfg.kind == "gilbert_elliott":
        model = GilbertElliott(
            check_probability(f"{key}.gemodel_p", cfg.gemodel_p),
            None if cfg.gemodel_r is None else check_probability(f"{key}.gemodel_r", cfg.gemodel_r),
            check_probability(f"{key}.gemodel_loss_bad", cfg.gemodel_loss_bad),
            check_probability(f"{key}.gemodel_loss_good", cfg.gemodel_loss_good))
    elif cfg.kind == "spec":
        model = parse_loss_spec(cfg.spec if cfg.spec is not None else "", f"{key}.spec")
    else:
        if cfg.matrix is not None:
            model = PerLink.from_matrix(cfg.matrix, f"{key}.matrix")
        else:
            if world_size is None:
                raise ConfigError(f"{key}.matrix", None, "a matrix, or a world size to apply the layout rule to")
            model = PerLink.from_layout(world_size, ranks_per_node,
                                        parse_loss_spec(cfg.intra_node, f"{key}.intra_node"),
                                        parse_loss_spec(cfg.inter_node, f"{key}.inter_node"))
    if world_size is not None:
        model.check_world(world_size, key)
    return model

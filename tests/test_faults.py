"""Fault models in one process: statistics over ~10^6 decisions, determinism, spec parsing."""
import math

import numpy as np
import pytest

from hvd_unreliable.errors import ConfigError
from hvd_unreliable.faults import (Bernoulli, DelayConfig, DelayModel, GilbertElliott, LossConfig, PerLink,
                                   build_loss_model, parse_delay_spec, parse_loss_spec)

Z = 4.5  # two-sided bound; a correct model fails it with probability < 1e-5


def run_link(model, calls=1000, packets=1000, seed=7):
    return np.concatenate([model.decide(step, "phase", 0, 1, packets, seed=seed) for step in range(calls)])


@pytest.mark.parametrize("p", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_bernoulli_loss_rate_within_binomial_bound(p):
    lost = run_link(Bernoulli(p))
    n = lost.size
    assert n == 10 ** 6
    bound = Z * math.sqrt(p * (1 - p) / n)
    assert abs(lost.mean() - p) <= bound + 1e-12


def batch_means_se(x, batches=100):
    means = x.reshape(batches, -1).mean(axis=1)
    return means.std(ddof=1) / math.sqrt(batches)


@pytest.mark.parametrize("p,r,loss_bad,loss_good", [(0.01, 0.1, 0.7, 0.001), (0.05, 0.3, 1.0, 0.0), (0.2, None, 0.9, 0.05)])
def test_gilbert_elliott_mean_loss_matches_stationary_formula(p, r, loss_bad, loss_good):
    model = GilbertElliott(p, r, loss_bad, loss_good)
    lost = run_link(model).astype(float)
    r_ = 1 - p if r is None else r
    pi_b = p / (p + r_)
    expected = (1 - pi_b) * loss_good + pi_b * loss_bad
    assert model.mean_loss == pytest.approx(expected)
    assert abs(lost.mean() - expected) <= Z * batch_means_se(lost)


@pytest.mark.parametrize("p,r", [(0.01, 0.1), (0.05, 0.5)])
def test_gilbert_elliott_burst_length_is_one_over_r(p, r):
    lost = run_link(GilbertElliott(p, r))  # 1-h = 100%, 1-k = 0: lost <=> Bad state
    edges = np.diff(np.concatenate([[0], lost.astype(np.int8), [0]]))
    bursts = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    mean = bursts.mean()
    se = math.sqrt((1 - r) / r ** 2 / bursts.size)  # geometric(r) burst lengths
    assert abs(mean - 1 / r) <= Z * se


def test_gilbert_elliott_vectorised_chain_equals_per_packet_loop():
    model = GilbertElliott(0.3, 0.2, 0.8, 0.1)
    rng = np.random.default_rng(1)
    for start in (False, True):
        u = rng.random(5000)
        bad, expected = start, []
        for uk in u:  # netem: transition draw first, then the packet is in the new state
            bad = (uk >= model.r) if bad else (uk < model.p)
            expected.append(bad)
        assert np.array_equal(model._states(u, start), expected)


def test_gilbert_elliott_chain_state_persists_per_link_and_checkpoints():
    a, b = GilbertElliott(0.3, 0.3), GilbertElliott(0.3, 0.3)
    whole = np.concatenate([a.decide(s, "x", 0, 1, 100, seed=3) for s in range(20)])
    first = [b.decide(s, "x", 0, 1, 100, seed=3) for s in range(10)]
    state = b.state_dict()
    c = GilbertElliott(0.3, 0.3)
    c.load_state_dict(state)
    rest = [c.decide(s, "x", 0, 1, 100, seed=3) for s in range(10, 20)]
    assert np.array_equal(whole, np.concatenate(first + rest))


def test_decisions_are_pure_functions_of_their_coordinates():
    m = Bernoulli(0.3)
    a = m.decide(5, "reduce_scatter", 1, 2, 1000, seed=11)
    assert np.array_equal(a, m.decide(5, "reduce_scatter", 1, 2, 1000, seed=11))
    for other in [m.decide(5, "reduce_scatter", 1, 2, 1000, seed=12), m.decide(6, "reduce_scatter", 1, 2, 1000, seed=11),
                  m.decide(5, "all_gather", 1, 2, 1000, seed=11), m.decide(5, "reduce_scatter", 2, 1, 1000, seed=11),
                  m.decide(5, "reduce_scatter", 1, 2, 1000, seed=11, call=1)]:
        assert not np.array_equal(a, other)
    # a prefix is stable: packet k's decision does not depend on how many packets follow
    assert np.array_equal(a[:10], m.decide(5, "reduce_scatter", 1, 2, 10, seed=11))


@pytest.fixture(params=["c", "numpy"])
def message_decisions(request, monkeypatch):
    """Bernoulli's whole-message decisions in C (``_decide.c``, built by `make setup`) and with
    NumPy windows (where it is not built, or HVDU_NATIVE=0)."""
    from hvd_unreliable.faults import loss

    if request.param == "c":
        assert loss._LOST_LINKS is not None, "hvd_unreliable/faults/_decide.c is not built: make setup"
    else:
        monkeypatch.setattr(loss, "_LOST_LINKS", None)
    return request.param


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_whole_message_fast_path_equals_the_vectorised_decisions(p, message_decisions):
    rng = np.random.default_rng(1)
    for _ in range(300):
        links = int(rng.integers(1, 80))
        src, dst = rng.integers(0, 4096, (2, links)).tolist()
        step = int(rng.choice([rng.integers(0, 10**6), rng.integers(-10**6, 0), rng.integers(2**62, 2**63)]))
        call, seed = int(rng.integers(0, 50)), int(rng.integers(0, 2**63))
        model = Bernoulli(p)
        fast = model.lost_messages(step, "all_gather", src, dst, seed, call)
        slow = [bool(d[0]) for d in model.decide_links(step, "all_gather", src, dst, [1] * links, seed, call)]
        assert fast == slow


def test_whole_message_decisions_computed_ahead_equal_those_of_each_step(message_decisions):
    # steps one after another across the window's edges, interleaved phases and calls, jumps
    # back (a resumed run) and far ahead: every answer is the vectorised decision of that step
    from hvd_unreliable.faults.loss import AHEAD

    # (and so does a decider, built once per phase and call as the transport builds it per layout)
    model, src, dst = Bernoulli(0.3), [1, 0, 2, 1], [0, 1, 1, 2]
    steps = list(range(2 * AHEAD + 5)) + [7, AHEAD - 1, AHEAD, 10**9, 3, -2]
    calls = [("reduce_scatter", 0), ("all_gather", 0), ("all_gather", 1)]
    deciders = {(phase, call): model.message_decider(phase, src, dst, 5, call) for phase, call in calls}
    lost = 0
    for step in steps:
        for phase, call in calls:
            got = model.lost_messages(step, phase, src, dst, 5, call)
            assert got == [bool(d[0]) for d in model.decide_links(step, phase, src, dst, [1] * 4, 5, call)], (step, phase)
            assert list(deciders[phase, call](step)) == got, (step, phase, call)
            lost += sum(got)
    assert 0.25 < lost / (len(steps) * 3 * 4) < 0.35


def test_a_window_of_decisions_leaves_no_object_per_step_for_the_garbage_collector(message_decisions):
    # a window holds one int per step (a bit per link), the few patterns that occur as tuples:
    # a tuple per step set off Python's full collection every few windows, a pause of a few
    # hundred ms with torch loaded (python bench/bench_long_run.py --against a2ef892)
    import gc

    from hvd_unreliable.faults.loss import AHEAD

    decide = Bernoulli(0.3).message_decider("x", [1, 0, 2], [0, 1, 1], 5, 0)
    decide(0)
    gc.disable()
    try:
        before = len(gc.get_objects(generation=0))
        answers = {decide(step) for step in range(AHEAD, 2 * AHEAD)}  # a new window, every step of it
        grown = len(gc.get_objects(generation=0)) - before
    finally:
        gc.enable()
    assert len(answers) == 8 and grown <= 2 * len(answers) + 8, grown


@pytest.mark.parametrize("inter", ["random 20%", "gemodel 5% 30% 80% 1%"])
def test_per_link_whole_message_decisions_equal_those_link_by_link(inter):
    # a layout rule (2 ranks per node, 6 ranks) and a matrix of Bernoulli models; Gilbert-Elliott
    # chains advance the same way whether a model decides its links together or one by one
    alone = [PerLink.from_layout(6, 2, Bernoulli(0.0), parse_loss_spec(inter)),
             PerLink.from_matrix(np.random.default_rng(0).uniform(0, 0.5, (6, 6)))]
    src, dst = [s for s in range(6) for d in range(6) if s != d], [d for s in range(6) for d in range(6) if s != d]
    deciders = [m.message_decider("all_gather", src, dst, 9, 0) for m in (  # (models and chains of their own)
        PerLink.from_layout(6, 2, Bernoulli(0.0), parse_loss_spec(inter)),
        PerLink.from_matrix(np.random.default_rng(0).uniform(0, 0.5, (6, 6))))]
    lost = 0
    for step in range(300):
        for b, decide in zip(alone, deciders):
            got = list(decide(step))
            assert got == [bool(x[0]) for x in b.decide_links(step, "all_gather", src, dst, [1] * len(src), 9, 0)], step
            lost += sum(got)
    assert lost > 0


def test_per_link_matrix_is_asymmetric_and_validated():
    m = PerLink.from_matrix([[0, 1, 0], [0, 0, 0], [0, 0, 0]])
    assert m.decide(0, "x", 0, 1, 50).all() and not m.decide(0, "x", 1, 0, 50).any()
    m.check_world(3)
    with pytest.raises(ConfigError, match=r"loss.matrix.*3x3.*4x4"):
        m.check_world(4)
    with pytest.raises(ConfigError, match=r"loss.matrix\[1\]\[0\]=1.5.*probability"):
        PerLink.from_matrix([[0, 0], [1.5, 0]])
    with pytest.raises(ConfigError, match="square"):
        PerLink.from_matrix([[0, 0, 0], [0, 0, 0]])


def test_per_link_layout_rule_keeps_node_links_reliable():
    m = build_loss_model(LossConfig(kind="per_link", intra_node="none", inter_node="random 100%"),
                         world_size=4, ranks_per_node=2)
    assert not m.decide(0, "x", 0, 1, 10).any() and not m.decide(0, "x", 3, 2, 10).any()
    assert m.decide(0, "x", 1, 2, 10).all() and m.decide(0, "x", 3, 0, 10).all()
    assert m.mean_loss == pytest.approx(8 / 12)


def test_netem_spec_strings():
    assert parse_loss_spec("random 5%") == Bernoulli(0.05)
    assert parse_loss_spec("random 0.2").p == 0.2
    assert parse_loss_spec("loss random 1%").p == pytest.approx(0.01)
    ge = parse_loss_spec("gemodel 1% 10% 70% 0.1%")
    assert (ge.p, ge.r, ge.loss_bad, ge.loss_good) == pytest.approx((0.01, 0.1, 0.7, 0.001))
    ge = parse_loss_spec("gemodel 2%")  # netem defaults
    assert (ge.r, ge.loss_bad, ge.loss_good) == pytest.approx((0.98, 1.0, 0.0))
    assert parse_loss_spec("none").p == 0.0


@pytest.mark.parametrize("spec", ["random", "random 120%", "random -1%", "gemodel", "gemodel 1% 2% 3% 4% 5%",
                                  "drop 5%", "random five", ""])
def test_bad_loss_specs_name_key_value_and_accepted(spec):
    with pytest.raises(ConfigError) as e:
        parse_loss_spec(spec, key="network.loss.spec")
    assert "network.loss.spec" in str(e.value) and "expected" in str(e.value)


def test_a_probability_out_of_range_in_a_spec_is_quoted_as_typed():
    with pytest.raises(ConfigError, match=r"network.loss.spec \(r\)='200%' is invalid: expected a probability in \[0, 1\]"):
        parse_loss_spec("gemodel 1% 200%", key="network.loss.spec")


@pytest.mark.parametrize("cfg,key", [(LossConfig(p=1.5), "network.loss.p"), (LossConfig(p=float("nan")), "network.loss.p"),
                                     (LossConfig(arrival_rate=-0.1), "network.loss.arrival_rate"),
                                     (LossConfig(kind="netem"), "network.loss.kind"),
                                     (LossConfig(p=0.1, arrival_rate=0.5), "network.loss.p")])
def test_bad_loss_configs(cfg, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_loss_model(cfg)


def test_arrival_rate_is_one_minus_p():
    assert build_loss_model(LossConfig(arrival_rate=0.9)).p == pytest.approx(0.1)


N = 200_000


@pytest.mark.parametrize("cfg,std", [
    (DelayConfig(kind="exponential", mean=0.05), lambda m: m),
    (DelayConfig(kind="shifted_exponential", shift=0.01, mean=0.04), lambda m: 0.04),
    (DelayConfig(kind="pareto", scale=0.01, shape=3.0), lambda m: 0.01 * math.sqrt(3 / ((3 - 1) ** 2 * (3 - 2)))),
    (DelayConfig(kind="uniform", low=0.01, high=0.03), lambda m: 0.02 / math.sqrt(12)),
    (DelayConfig(kind="lognormal", mean=0.05, sigma=0.5), lambda m: m * math.sqrt(math.exp(0.25) - 1)),
    (DelayConfig(kind="constant", mean=0.02), lambda m: 0.0),
])
def test_delay_samples_match_distribution_mean(cfg, std):
    model = DelayModel(cfg, seed=3)
    x = model.sample(step=0, rank=1, count=N)
    assert abs(x.mean() - model.mean) <= Z * std(model.mean) / math.sqrt(N) + 1e-15
    assert (x >= 0).all()
    if cfg.kind == "shifted_exponential":
        assert x.min() >= cfg.shift and x.min() - cfg.shift < 1e-5


def test_delays_are_deterministic_per_step_and_rank():
    m = DelayModel(DelayConfig(kind="exponential", mean=1.0), seed=1)
    assert m(3, 2) == m(3, 2) and m(3, 2) != m(4, 2) and m(3, 2) != m(3, 1)
    assert m(3, 2) != DelayModel(DelayConfig(kind="exponential", mean=1.0), seed=2)(3, 2)


def test_trace_replay(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("0.1,0.2\n0.3,0.4\n")
    m = DelayModel(DelayConfig(kind="trace", trace=str(path)))
    assert [m(0, 0), m(0, 1), m(1, 0), m(1, 1), m(2, 0)] == [0.1, 0.2, 0.3, 0.4, 0.1]
    assert m.mean == pytest.approx(0.25)


@pytest.mark.parametrize("cfg,key", [
    (DelayConfig(kind="exponential", mean=-1.0), "network.delay.mean"),
    (DelayConfig(kind="exponential", mean=float("nan")), "network.delay.mean"),
    (DelayConfig(kind="exponential", mean=0.0), "network.delay.mean"),
    (DelayConfig(kind="pareto", scale=0.01, shape=1.0), "network.delay.shape"),
    (DelayConfig(kind="uniform", low=0.2, high=0.1), "network.delay.high"),
    (DelayConfig(kind="gamma"), "network.delay.kind"),
    (DelayConfig(kind="trace", trace="/nonexistent.csv"), "network.delay.trace"),
])
def test_bad_delay_configs(cfg, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        DelayModel(cfg)


def test_delay_spec_strings():
    assert parse_delay_spec("exponential 50ms") == DelayConfig(kind="exponential", mean=0.05)
    assert parse_delay_spec("shifted_exponential 10ms 0.04") == DelayConfig(kind="shifted_exponential", shift=0.01, mean=0.04)
    assert parse_delay_spec("pareto 10ms 2.5") == DelayConfig(kind="pareto", scale=0.01, shape=2.5)
    for bad in ["exponential", "exponential fast", "pareto 10ms 2ms", "weibull 1s"]:
        with pytest.raises(ConfigError, match="network.delay.spec"):
            parse_delay_spec(bad)

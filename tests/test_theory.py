"""Paper B's runtime formulas against the Monte-Carlo simulator of the same queueing model."""
import pytest

from hvd_unreliable.errors import ConfigError
from hvd_unreliable.theory import expected_time, harmonic, simulate, speedup_async_over_sync

CASES = [(v, P, K, shift) for v in ("k_sync", "k_batch_sync", "k_async", "k_batch_async")
         for P in (2, 4, 8, 16) for K in sorted({1, P // 2, P}) for shift in (0.0, 0.3)]


@pytest.mark.parametrize("variant,P,K,shift", CASES)
def test_closed_forms_match_the_simulator_within_two_percent(variant, P, K, shift):
    sim = simulate(variant, P, K, mean=1.0, shift=shift, updates=50_000, seed=P * 100 + K)
    exact = expected_time(variant, P, K, mean=1.0, shift=shift)
    if exact is None:  # no closed form: the table's bound (where it has one) must hold
        bound = expected_time(variant, P, K, mean=1.0, shift=shift, exact_only=False)
        if bound is not None:
            assert sim["mean"] <= bound
        return
    assert abs(sim["mean"] - exact) <= 0.02 * exact, (sim, exact)


def test_fully_sync_over_async_speedup_is_p_times_harmonic_p():
    for P in (2, 8, 16):
        sync = expected_time("k_sync", P, P, mean=1.0)
        async_ = expected_time("k_async", P, 1, mean=1.0)
        assert sync / async_ == pytest.approx(speedup_async_over_sync(P)) == pytest.approx(P * harmonic(P))


def test_simulator_scales_to_a_thousand_learners():
    r = simulate("k_batch_async", 1000, 100, mean=1.0, updates=2000)
    assert r["mean"] == pytest.approx(0.1, rel=0.02)
    r = simulate("k_sync", 1000, 500, mean=1.0, updates=2000)
    assert r["mean"] == pytest.approx(harmonic(1000) - harmonic(500), rel=0.02)


@pytest.mark.parametrize("args,key", [(("k_sync", 4, 5), "algorithm.k"), (("k_sync", 0, 1), "num_learners"),
                                      (("fully_async", 4, 1), "algorithm.name")])
def test_bad_arguments(args, key):
    with pytest.raises(ConfigError, match=key):
        expected_time(*args, mean=1.0)

"""Rank-side code of the training tests: the training app's rank part on a composed config."""
from pathlib import Path


def parameter_server(overrides, out_dir):
    """One parameter-server run of the app's config with ``overrides``: what the ranks of
    ``python -m hvd_unreliable.train`` do, without a launch of its own (rank 0 writes to ``out_dir``)."""
    from hvd_unreliable.jobs import compose
    from hvd_unreliable.training.ps_loop import train_ps

    summary = train_ps(compose(overrides), Path(out_dir))
    return summary.get("ps", {}).get("updates")

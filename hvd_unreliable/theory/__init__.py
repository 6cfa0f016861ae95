"""Paper B's runtime theory and a Monte-Carlo simulator of the same queueing model (no MPI)."""
from .runtime import VARIANTS, expected_time, harmonic, simulate, speedup_async_over_sync

__all__ = ["VARIANTS", "expected_time", "simulate", "harmonic", "speedup_async_over_sync"]

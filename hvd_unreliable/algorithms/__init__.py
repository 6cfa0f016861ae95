"""Layer 3, algorithms written against the transport: RPS, lossy allreduce, parameter server."""
from .blockwise import blockwise_average, partition
from .lossy_allreduce import lossy_allreduce
from .rps import rps_average

__all__ = ["rps_average", "lossy_allreduce", "blockwise_average", "partition"]

"""Layer 2, transport: the only code that moves bytes between ranks; applies the fault models."""
from .stats import TransportStats
from .transport import CANCEL_TAG, Received, Transport, element_mask, packetize

__all__ = ["Transport", "Received", "TransportStats", "packetize", "element_mask", "CANCEL_TAG"]

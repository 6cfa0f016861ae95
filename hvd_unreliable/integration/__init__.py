"""Layer 4, integration: the communication context, broadcasts, the optimizer wrapper."""

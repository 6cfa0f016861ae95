"""Layer 1, fault models: pure, seeded, no MPI. "Is this message lost?" and "how slow is this learner?"."""
from .delay import DelayConfig, DelayModel, parse_delay_spec
from .loss import (Bernoulli, GilbertElliott, LossConfig, LossModel, PerLink, build_loss_model,
                   parse_loss_spec)

__all__ = ["Bernoulli", "GilbertElliott", "PerLink", "LossModel", "LossConfig", "build_loss_model",
           "parse_loss_spec", "DelayConfig", "DelayModel", "parse_delay_spec"]

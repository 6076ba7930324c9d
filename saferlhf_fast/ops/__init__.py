"""Public functional ops.  Each family: a dispatcher choosing a backend (``backend=`` / ``$SAFERLHF_BACKEND`` /
device default) and an autograd Function; ``reference`` holds the readable torch spec."""
from . import reference
from .dense import linear
from .gae import gae
from .layers import add_rms_norm, rms_norm, rope, swiglu
from .logprobs import IGNORE_INDEX, gather_logprobs, linear_logprobs
from .lora import lora_linear
from .losses import critic_loss, kl_penalized_rewards, masked_mean, ppo_actor_loss, ppo_lag_actor_loss

__all__ = [
    "IGNORE_INDEX",
    "add_rms_norm",
    "critic_loss",
    "gae",
    "gather_logprobs",
    "kl_penalized_rewards",
    "linear",
    "linear_logprobs",
    "lora_linear",
    "masked_mean",
    "ppo_actor_loss",
    "ppo_lag_actor_loss",
    "reference",
    "rms_norm",
    "rope",
    "swiglu",
]

"""Host launchers of the Triton kernels (``saferlhf_fast.kernels.launchers``), with the names and signatures of the
``torch.ops.saferlhf`` ops (docs/kernels.md).  No torch.autograd here: the dispatchers in saferlhf_fast/ops do it.

The top-level ``kernels/`` folder deliberately has no ``__init__.py``: it ships only as the namespace package
``saferlhf_fast.kernels`` (the symlink ``saferlhf_fast/kernels``), so a checkout never shadows Hugging Face's
installed ``kernels`` package, which transformers imports at start-up (tests/test_packaging.py).

Importing needs triton (an ImportError otherwise, which the backend dispatcher reports); it needs no GPU.  On CPU
tensors the kernels run under the Triton interpreter, which must be switched on (``TRITON_INTERPRET=1``) before
this module is first imported."""
from saferlhf_fast.kernels.gae import gae_forward
from saferlhf_fast.kernels.logprobs import logprobs_backward, logprobs_forward
from saferlhf_fast.kernels.losses import clipped_value_objective, kl_penalized_rewards, ppo_clip_objective

__all__ = [
    "clipped_value_objective",
    "gae_forward",
    "kl_penalized_rewards",
    "logprobs_backward",
    "logprobs_forward",
    "ppo_clip_objective",
]

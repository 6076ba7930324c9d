"""runtime.tune_allocator: glibc malloc thresholds, once per process, opt-out by environment."""
import subprocess
import sys

import pytest

from saferlhf_fast import runtime

pytestmark = pytest.mark.skipif(runtime._glibc() is None, reason="needs glibc")

_PROBE = """
import resource
from saferlhf_fast import runtime
applied = runtime.tune_allocator()
import torch
from saferlhf_fast.models.llama import LlamaForScore, ModelConfig
torch.manual_seed(0)
cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4)
model = LlamaForScore(cfg).eval().requires_grad_(False)
ids = torch.randint(0, 512, (16, 80))
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
with torch.no_grad():
    for _ in range(3):
        model(ids)
    f0 = faults()
    for _ in range(20):
        model(ids)  # 0.3-3.5 MiB activations allocated and freed
print(applied, faults() - f0)
"""


def _probe(env_value):
    import os

    env = dict(os.environ, **{runtime.ENV_VAR: env_value})
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


def test_tuned_allocator_reuses_freed_blocks_instead_of_faulting_them_in():
    applied, faults = _probe("1")
    off_applied, off_faults = _probe("0")
    assert applied and not off_applied
    # glibc's defaults fault the activations in again on every forward; the tuned heap reuses them.
    assert off_faults > 1000
    assert faults < off_faults / 5


def test_applied_once():
    first = runtime.tune_allocator()
    assert runtime.tune_allocator() is first

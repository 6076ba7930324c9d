"""The lean decoder (Llama family, Qwen3, Gemma 2 / 3) with causal-LM and score heads, attention backends, HF
checkpoint IO.

```python
from saferlhf_fast.models import from_pretrained
model = from_pretrained(path, head="lm" | "score", dtype=torch.float32, attn_backend=None)
out = model(input_ids, attention_mask)      # lm: out.logits [B, L, V]; score: out.scores [B, L], out.end_scores [B]
logp = model.token_logprobs(input_ids, attention_mask)   # [B, L-1] fp32, no [tokens, V] logits
model.save_pretrained(dir)                  # transformers loads it
```
"""
from .attention import BACKENDS as ATTN_BACKENDS
from .attention import StaticKVCache
from .checkpoint import (
    SUPPORTED_MODEL_TYPES,
    CheckpointError,
    UnsupportedArchitectureError,
    build_model,
    config_from_hf,
    config_to_hf,
    convert_gguf,
    from_pretrained,
    read_state_dict,
    save_pretrained,
)
from .llama import (
    CausalLMOutput,
    DecoderModel,
    LlamaForCausalLM,
    LlamaForScore,
    ModelConfig,
    ScoreOutput,
    hold_in_bf16,
    positions_from_mask,
)
from .memory import freeze, offload, on_device, onload

__all__ = [
    "ATTN_BACKENDS",
    "CausalLMOutput",
    "CheckpointError",
    "DecoderModel",
    "LlamaForCausalLM",
    "LlamaForScore",
    "ModelConfig",
    "SUPPORTED_MODEL_TYPES",
    "ScoreOutput",
    "StaticKVCache",
    "UnsupportedArchitectureError",
    "build_model",
    "config_from_hf",
    "config_to_hf",
    "convert_gguf",
    "freeze",
    "from_pretrained",
    "hold_in_bf16",
    "offload",
    "on_device",
    "onload",
    "positions_from_mask",
    "read_state_dict",
    "save_pretrained",
]

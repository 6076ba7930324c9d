"""Op benchmarks: every op family against the reference implementation's way of computing it, in one run.

Baselines (provider ``baseline``), as PKU-Alignment/safe-rlhf computes them:
* gather_logprobs: full ``log_softmax(logits.float())`` then ``gather``;
* linear_logprobs: ``hidden @ weight.T`` then the same, forward + backward;
* gae: the Python loop over time, called once per stream (reward, then cost);
* ppo_losses: eager PPO-Lag actor loss + both critic losses, forward + backward through autograd;
* attention: torch's SDPA (its fused CPU flash kernel, causal, grouped-query), forward + backward, against the
  extension's CPU kernel (provider ``cpu``, ``models/attention.py`` backend ``native``), on CPU only;
* rope / swiglu / rms_norm: the model's eager torch expressions (``x * cos + roll(x, d/2) * sin_signed`` on the
  transposed ``[B, H, L, d]`` views, ``F.silu(gate) * up``, ``F.rms_norm``), forward + backward through autograd,
  against ``ops.rope`` / ``ops.swiglu`` / ``ops.rms_norm`` (provider ``cpu``, csrc/layer_ops.cpp), on CPU only;
* lora_linear: a LoRA projection (frozen base, trainable rank-r adapter), forward + backward, as PEFT composes it on
  ``F.linear`` (baseline), as the same composition on our ``ops.linear`` (provider ``composed``), and as
  ``ops.lora_linear``'s one autograd node (provider ``cpu``), on CPU only.
Our providers are the op backends available on the device (``cpu``; ``triton`` / ``cuda`` on GPU); on GPU the
linear log-prob forward also gets a ``matmul`` row (the lm_head matmul alone: the floor it is compared to).
"""
from __future__ import annotations

import torch

from .. import _backend, ops
from ..ops import reference
from .harness import Case, format_table, make_row, peak_memory, summarize, time_interleaved, write_rows

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (kernel, mode, shape args, dtype) per size preset.  "default" holds the CPU target sizes (docs/performance.md).
SIZES = {
    "tiny": [
        ("gather_logprobs", "forward", {"n": 64, "v": 1000}, "fp32"),
        ("linear_logprobs", "full", {"n": 64, "h": 32, "v": 1000}, "fp32"),
        ("gae", "forward", {"streams": 2, "b": 4, "t": 64}, "fp32"),
        ("ppo_losses", "full", {"b": 4, "t": 64}, "fp32"),
        ("attention", "full", {"b": 2, "hq": 4, "hk": 2, "l": 24, "d": 16}, "fp32"),
        ("attention", "full", {"b": 2, "hq": 4, "hk": 2, "l": 24, "d": 16}, "bf16"),
        ("lora_linear", "full", {"m": 40, "k": 32, "n": 48, "r": 4}, "fp32"),
    ],
    "default": [
        ("gather_logprobs", "forward", {"n": 8192, "v": 32000}, "fp32"),
        ("gather_logprobs", "full", {"n": 8192, "v": 32000}, "fp32"),
        ("gather_logprobs", "forward", {"n": 8192, "v": 32000}, "bf16"),
        ("linear_logprobs", "full", {"n": 4096, "h": 512, "v": 32000}, "fp32"),
        ("gae", "forward", {"streams": 2, "b": 64, "t": 1024}, "fp32"),
        ("ppo_losses", "full", {"b": 64, "t": 1024}, "fp32"),
        ("attention", "full", {"b": 8, "hq": 8, "hk": 4, "l": 80, "d": 32}, "fp32"),  # the 7M model's training batch
        ("attention", "full", {"b": 8, "hq": 9, "hk": 3, "l": 80, "d": 64}, "fp32"),  # SmolLM2-135M heads
        ("attention", "full", {"b": 4, "hq": 8, "hk": 4, "l": 512, "d": 64}, "fp32"),  # NATIVE_MAX_SEQLEN
        # the default model's heads at the realistic PPO training batch (8 x (64 + 256) tokens), both dtypes
        ("attention", "full", {"b": 8, "hq": 4, "hk": 4, "l": 320, "d": 64}, "fp32"),
        ("attention", "full", {"b": 8, "hq": 4, "hk": 4, "l": 320, "d": 64}, "bf16"),
        # the decoder's elementwise layers at the 7M model's training batch (B 16, L 80, hidden 256, inter 688)
        ("rope", "full", {"b": 16, "l": 80, "hq": 4, "hk": 4, "d": 64}, "fp32"),
        ("rope", "full", {"b": 16, "l": 80, "hq": 8, "hk": 4, "d": 32}, "fp32"),
        ("swiglu", "full", {"b": 16, "l": 80, "i": 688}, "fp32"),
        ("rms_norm", "full", {"b": 16, "l": 80, "h": 256}, "fp32"),
        # LoRA r16 projections at the realistic PPO training batch (8 x 320 tokens): the default model's gate_proj
        # and down_proj, SmolLM2-135M's gate_proj
        ("lora_linear", "full", {"m": 2560, "k": 256, "n": 688, "r": 16}, "fp32"),
        ("lora_linear", "full", {"m": 2560, "k": 688, "n": 256, "r": 16}, "fp32"),
        ("lora_linear", "full", {"m": 2560, "k": 576, "n": 1536, "r": 16}, "fp32"),
    ],
    "gpu": [
        ("gather_logprobs", "forward", {"n": 32768, "v": 131072}, "bf16"),
        ("gather_logprobs", "full", {"n": 32768, "v": 131072}, "bf16"),
        ("linear_logprobs", "forward", {"n": 32768, "h": 4096, "v": 131072}, "bf16"),
        ("linear_logprobs", "full", {"n": 8192, "h": 4096, "v": 131072}, "bf16"),
        ("gae", "forward", {"streams": 2, "b": 64, "t": 1024}, "fp32"),
        ("ppo_losses", "full", {"b": 256, "t": 1024}, "fp32"),
    ],
}


def _gen(device: str, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def build_gather(provider: str, n: int, v: int, dtype: str, device: str, mode: str):
    g = _gen(device)
    logits = torch.randn(n, v, generator=g, device=device).to(_DTYPES[dtype])
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    backward = mode == "full"
    if backward:
        logits.requires_grad_()
    weights = torch.randn(n, generator=g, device=device)

    def run():
        if provider == "baseline":
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        else:
            logp = ops.gather_logprobs(logits, labels, backend=provider)
        if backward:
            logits.grad = None
            (logp * weights).sum().backward()
        return logp

    return run


def build_linear(provider: str, n: int, h: int, v: int, dtype: str, device: str, mode: str):
    g = _gen(device)
    dt = _DTYPES[dtype]
    hidden = torch.randn(n, h, generator=g, device=device).to(dt)
    weight = (torch.randn(v, h, generator=g, device=device) / h**0.5).to(dt)
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    backward = mode == "full"
    if backward:
        hidden.requires_grad_()
        weight.requires_grad_()
    weights = torch.randn(n, generator=g, device=device)

    def run():
        if provider == "matmul":
            return hidden @ weight.t()
        if provider == "baseline":
            logits = hidden @ weight.t()
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        else:
            logp = ops.linear_logprobs(hidden, weight, labels, backend=provider)
        if backward:
            hidden.grad = weight.grad = None
            (logp * weights).sum().backward()
        return logp

    return run


def build_gae(provider: str, streams: int, b: int, t: int, dtype: str, device: str, mode: str):
    g = _gen(device)
    rewards = torch.randn(streams, b, t, generator=g, device=device)
    values = torch.randn(streams, b, t, generator=g, device=device)
    lengths = torch.randint(1, t + 1, (b,), generator=g, device=device)
    mask = torch.arange(t, device=device).unsqueeze(0) < lengths.unsqueeze(1)

    def run():
        if provider == "baseline":
            return [reference.gae(rewards[s], values[s], mask) for s in range(streams)]
        return ops.gae(rewards, values, mask.expand(streams, b, t), backend=provider)

    return run


def build_losses(provider: str, b: int, t: int, dtype: str, device: str, mode: str):
    g = _gen(device)

    def rand(scale=1.0):
        return torch.randn(b, t, generator=g, device=device) * scale

    old_logp, adv_r, adv_c = rand(0.5), rand(), rand()
    logp = (old_logp + rand(0.2)).requires_grad_()
    old_r, old_c, ret_r, ret_c = rand(3), rand(3), rand(3), rand(3)
    v_r = (old_r + rand(4)).requires_grad_()
    v_c = (old_c + rand(4)).requires_grad_()
    lengths = torch.randint(1, t + 1, (b,), generator=g, device=device)
    mask = torch.arange(t, device=device).unsqueeze(0) < lengths.unsqueeze(1)
    impl = reference if provider == "baseline" else None

    def run():
        logp.grad = v_r.grad = v_c.grad = None
        if impl is not None:
            actor = impl.ppo_lag_actor_loss(logp, old_logp, adv_r, adv_c, mask, multiplier=1.3)
            critic = impl.critic_loss(v_r, old_r, ret_r, mask) + impl.critic_loss(v_c, old_c, ret_c, mask)
        else:
            actor = ops.ppo_lag_actor_loss(logp, old_logp, adv_r, adv_c, mask, multiplier=1.3, backend=provider)
            critic = ops.critic_loss(v_r, old_r, ret_r, mask, backend=provider) + ops.critic_loss(
                v_c, old_c, ret_c, mask, backend=provider
            )
        (actor + critic).backward()
        return actor

    return run


def build_attention(provider: str, b: int, hq: int, hk: int, l: int, d: int, dtype: str, device: str, mode: str):
    from ..models import attention as attn

    g = _gen(device)
    # [B, L, H, D] leaves seen as [B, H, L, D], as a model's projection outputs are (both providers alike)
    leaves = [torch.randn(b, l, h, d, generator=g, device=device).to(_DTYPES[dtype]).requires_grad_()
              for h in (hq, hk, hk)]
    grad = torch.randn(b, hq, l, d, generator=g, device=device).to(_DTYPES[dtype])
    fn = attn.sdpa_attention if provider == "baseline" else attn.native_attention
    mask, scale = attn.Mask(is_causal=True), d ** -0.5

    def run():
        for t in leaves:
            t.grad = None
        q, k, v = (t.transpose(1, 2) for t in leaves)
        out = fn(q, k, v, mask, scale)
        out.backward(grad)
        return out

    return run


def build_rope(provider: str, b: int, l: int, hq: int, hk: int, d: int, dtype: str, device: str, mode: str):
    from ..ops import layers

    def apply_rope(x, c, s):  # the model's eager expression (models/llama.py before the fused op), inlined here
        return x * c + torch.roll(x, x.shape[-1] // 2, dims=-1) * s

    g = _gen(device)
    dt = _DTYPES[dtype]
    # leaves: the q / k projection outputs [B, L, H*d]; cos / sin_signed [B, L, d] as the rotary table lookup gives
    q_proj, k_proj = (torch.randn(b, l, h * d, generator=g, device=device).to(dt).requires_grad_() for h in (hq, hk))
    cos, sin = (torch.randn(b, l, d, generator=g, device=device).to(dt) for _ in range(2))
    grads = [torch.randn(b, l, h, d, generator=g, device=device).to(dt) for h in (hq, hk)]

    def run():
        q_proj.grad = k_proj.grad = None
        q, k = q_proj.view(b, l, hq, d), k_proj.view(b, l, hk, d)
        if provider == "baseline":  # the model: rope on the [B, H, L, d] views, cos / sin [B, 1, L, d]
            outs = [apply_rope(x.transpose(1, 2), cos[:, None], sin[:, None]) for x in (q, k)]
            torch.autograd.backward(outs, [gr.transpose(1, 2) for gr in grads])
        else:
            outs = layers.rope(q, k, cos, sin, backend=provider)
            torch.autograd.backward(list(outs), grads)
        return outs

    return run


def build_swiglu(provider: str, b: int, l: int, i: int, dtype: str, device: str, mode: str):
    from ..ops import layers

    g = _gen(device)
    gate, up = (torch.randn(b, l, i, generator=g, device=device).to(_DTYPES[dtype]).requires_grad_() for _ in range(2))
    grad = torch.randn(b, l, i, generator=g, device=device).to(_DTYPES[dtype])

    def run():
        gate.grad = up.grad = None
        out = layers.swiglu_reference(gate, up) if provider == "baseline" else layers.swiglu(gate, up, backend=provider)
        out.backward(grad)
        return out

    return run


def build_rms_norm(provider: str, b: int, l: int, h: int, dtype: str, device: str, mode: str):
    from ..ops import layers

    g = _gen(device)
    x = torch.randn(b, l, h, generator=g, device=device).to(_DTYPES[dtype]).requires_grad_()
    weight = (1 + 0.1 * torch.randn(h, generator=g, device=device)).to(_DTYPES[dtype]).requires_grad_()
    grad = torch.randn(b, l, h, generator=g, device=device).to(_DTYPES[dtype])

    def run():
        x.grad = weight.grad = None
        if provider == "baseline":
            out = layers.rms_norm_reference(x, weight, 1e-6)
        else:
            out = layers.rms_norm(x, weight, 1e-6, backend=provider)
        out.backward(grad)
        return out

    return run


def build_lora_linear(provider: str, m: int, k: int, n: int, r: int, dtype: str, device: str, mode: str):
    g = _gen(device)
    x = torch.randn(m, k, generator=g, device=device).to(_DTYPES[dtype]).requires_grad_()
    weight = (torch.randn(n, k, generator=g, device=device) / k**0.5).to(_DTYPES[dtype])
    a = (torch.randn(r, k, generator=g, device=device) / k**0.5).to(_DTYPES[dtype]).requires_grad_()
    b = (0.1 * torch.randn(n, r, generator=g, device=device)).to(_DTYPES[dtype]).requires_grad_()
    grad = torch.randn(m, n, generator=g, device=device).to(_DTYPES[dtype])
    base = {"baseline": torch.nn.functional.linear, "composed": ops.linear}.get(provider)

    def run():
        x.grad = a.grad = b.grad = None
        if base is None:
            out = ops.lora_linear(x, weight, None, a, b, 16.0 / r)
        else:
            out = reference.lora_linear(x, weight, None, a, b, 16.0 / r, base=base)
        out.backward(grad)
        return out

    return run


_BUILDERS = {
    "gather_logprobs": "saferlhf_fast.benchmarks.ops:build_gather",
    "linear_logprobs": "saferlhf_fast.benchmarks.ops:build_linear",
    "gae": "saferlhf_fast.benchmarks.ops:build_gae",
    "ppo_losses": "saferlhf_fast.benchmarks.ops:build_losses",
    "attention": "saferlhf_fast.benchmarks.ops:build_attention",
    "rope": "saferlhf_fast.benchmarks.ops:build_rope",
    "swiglu": "saferlhf_fast.benchmarks.ops:build_swiglu",
    "rms_norm": "saferlhf_fast.benchmarks.ops:build_rms_norm",
    "lora_linear": "saferlhf_fast.benchmarks.ops:build_lora_linear",
}

# The fused layer ops (ops/layers.py): C++ CPU kernels only; the op each one needs from the extension.
_LAYER_OPS = {"rope": "rope_forward", "swiglu": "swiglu_forward", "rms_norm": "rms_norm_forward"}

# The CPU memory targets: measured for these kernels only (each costs two fresh processes).
_MEMORY_KERNELS = {"gather_logprobs", "linear_logprobs"}


def providers(kernel: str, mode: str, device: str) -> list[str]:
    if kernel == "attention":
        from ..models.attention import native_available

        return ["baseline"] + (["cpu"] if device == "cpu" and native_available() else [])
    if kernel == "lora_linear":
        from ..ops.dense import onednn_available

        return ["baseline"] + (["composed", "cpu"] if device == "cpu" and onednn_available() else [])
    if kernel in _LAYER_OPS:
        return ["baseline"] + (["cpu"] if device == "cpu" and _backend.has_op(_LAYER_OPS[kernel]) else [])
    ours = [b for b in _backend.available_backends(device) if b != "torch"]
    if device == "cpu":
        ours = [b for b in ours if b != "triton"]  # the interpreter is a correctness tool, not a provider
    extra = ["matmul"] if (kernel == "linear_logprobs" and mode == "forward" and device == "cuda") else []
    return ["baseline", *extra, *ours]


def cases(size: str, device: str, kernels: list[str] | None = None) -> list[list[Case]]:
    groups = []
    if kernels:  # "--kernels a,b c" and "--kernels a b c" alike
        kernels = [k for entry in kernels for k in entry.split(",") if k]
    for kernel, mode, shape, dtype in SIZES[size]:
        if kernels and kernel not in kernels:
            continue
        x = ",".join(f"{k}={v}" for k, v in shape.items()) + f",{dtype}"
        group = [
            Case(kernel, p, mode, x, _BUILDERS[kernel], dict(shape, provider=p, dtype=dtype, device=device, mode=mode),
                 config=f"threads={torch.get_num_threads()}")
            for p in providers(kernel, mode, device)
        ]
        groups.append(group)
    return groups


def run(size: str = "default", device: str = "cpu", reps: int = 7, warmup: int = 2, memory: bool = True,
        csv_path: str | None = None, overwrite: bool = False, kernels: list[str] | None = None,
        echo=print, timer: str = "events") -> list[dict]:
    """Run the op benchmarks; returns the CSV rows (and appends them to ``csv_path``)."""
    rows: list[dict] = []
    for group in cases(size, device, kernels):
        times = time_interleaved(group, device, reps=reps, warmup=warmup, timer=timer)
        group_rows = []
        for case in group:
            group_rows.append(make_row(case, "time", "s", *summarize(times[case.provider]), device))
        if memory and group[0].kernel in _MEMORY_KERNELS:
            for case in group:
                if case.provider == "matmul":
                    continue
                peak = float(peak_memory(case, device))
                group_rows.append(make_row(case, "memory", "B", peak, peak, peak, device))
        echo(format_table(group_rows))
        rows.extend(group_rows)
    if csv_path:
        write_rows(csv_path, rows, overwrite=overwrite)
    return rows

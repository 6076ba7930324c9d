"""Roofline report for the log-prob kernels: measured time next to the floors of the same device.

* ``linear_logprobs`` forward: compute floor = ``2 N H V`` FLOP at the device's measured matmul rate (a plain
  ``hidden @ weight.T`` of the same shapes, timed in the same run), i.e. "within X of the matmul alone".
* ``gather_logprobs`` forward: bandwidth floor = the ``N V`` logits read once (plus labels and outputs) at the
  device's measured copy bandwidth (a copy of the logits into a preallocated buffer, which moves 2x the bytes,
  timed in the same run; preallocated so that first-touch page faults of a fresh buffer are not counted).

``dtypes`` (``--dtypes fp32 bf16``): each dtype against its own floors, so bf16 is reported against the machine's
measured bf16 matmul rate (oneDNN's AVX512-BF16 / AMX kernels on a CPU that has them), not the fp32 one.
"""
from __future__ import annotations

import torch

from .. import _backend, ops
from .harness import Case, make_row, summarize, time_interleaved

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

PRESETS = {
    "tiny": {"n": 256, "h": 64, "v": 2048, "dtype": "fp32"},
    "default": {"n": 4096, "h": 512, "v": 32000, "dtype": "fp32"},
    "gpu": {"n": 32768, "h": 4096, "v": 131072, "dtype": "bf16"},
}


def build_roofline(what: str, provider: str, n: int, h: int, v: int, dtype: str, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    dt = _DTYPES[dtype]
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    if what == "linear":
        hidden = torch.randn(n, h, generator=g, device=device).to(dt)
        weight = (torch.randn(v, h, generator=g, device=device) / h**0.5).to(dt)
        if provider == "matmul":
            return lambda: hidden @ weight.t()
        return lambda: ops.linear_logprobs(hidden, weight, labels, backend=provider)
    logits = torch.randn(n, v, generator=g, device=device).to(dt)
    if provider == "copy":
        out = torch.empty_like(logits)
        return lambda: out.copy_(logits)
    return lambda: ops.gather_logprobs(logits, labels, backend=provider)


def run(size: str = "default", device: str = "cpu", reps: int = 5, warmup: int = 1, backend: str | None = None,
        echo=print, dtypes=None) -> list[dict]:
    p = PRESETS[size]
    backend = backend or _backend.choose("gae", None, torch.device(device))
    rows, lines = [], []
    for dtype in dtypes or [p["dtype"]]:
        _measure(p["n"], p["h"], p["v"], dtype, device, reps, warmup, backend, rows, lines)
    echo(f"roofline on {rows[0]['device']} (backend {backend})")
    for line in lines:
        echo("  " + line)
    return rows


def _measure(n, h, v, dtype, device, reps, warmup, backend, rows: list, lines: list) -> None:
    """Both kernels in ``dtype`` against their floors; appends CSV rows and report lines."""
    elem = torch.empty((), dtype=_DTYPES[dtype]).element_size()
    for what, floor_provider in (("linear", "matmul"), ("gather", "copy")):
        shape = {"n": n, "h": h, "v": v} if what == "linear" else {"n": n, "v": v}
        x = ",".join(f"{k}={val}" for k, val in shape.items()) + f",{dtype}"
        kernel = f"{what}_logprobs"
        group = [
            Case(kernel, prov, "forward", x, "saferlhf_fast.benchmarks.roofline:build_roofline",
                 dict(what=what, provider=prov, n=n, h=h, v=v, dtype=dtype, device=device), config="roofline")
            for prov in (floor_provider, backend)
        ]
        times = time_interleaved(group, device, reps=reps, warmup=warmup)
        floor_t = summarize(times[floor_provider])[0]
        ours_t = summarize(times[backend])[0]
        for case in group:
            rows.append(make_row(case, "time", "s", *summarize(times[case.provider]), device))
        if what == "linear":
            flop = 2.0 * n * h * v
            rows.append(make_row(group[1], "tflops", "TFLOP/s", flop / ours_t / 1e12, flop / ours_t / 1e12,
                                 flop / ours_t / 1e12, device))
            lines.append(
                f"linear_logprobs fwd {x}: {ours_t * 1e3:.3f} ms = {ours_t / floor_t:.2f}x the matmul alone "
                f"({floor_t * 1e3:.3f} ms, {flop / floor_t / 1e12:.3g} TFLOP/s; "
                f"ours {flop / ours_t / 1e12:.3g} TFLOP/s)"
            )
        else:
            moved = n * v * elem + n * (8 + 4 * 3)  # logits once + labels + logp/lse/entropy
            bandwidth = 2 * n * v * elem / floor_t  # the copy reads and writes the logits
            floor_bw_t = moved / bandwidth
            rows.append(make_row(group[1], "bandwidth", "GB/s", moved / ours_t / 1e9, moved / ours_t / 1e9,
                                 moved / ours_t / 1e9, device))
            lines.append(
                f"gather_logprobs fwd {x}: {ours_t * 1e3:.3f} ms for {moved / 1e6:.1f} MB = "
                f"{moved / ours_t / 1e9:.3g} GB/s; bandwidth floor {floor_bw_t * 1e3:.3f} ms at the copy's "
                f"{bandwidth / 1e9:.3g} GB/s ({ours_t / floor_bw_t:.2f}x the floor)"
            )

"""Turn a benchmark CSV into PNG charts: per (kernel, mode), speed-up over the baseline (time and rates such as
tokens/s) and memory as a fraction of the baseline, one bar per (size, provider).  Uses the latest row of each
(kernel, provider, mode, metric, x, device)."""
from __future__ import annotations

import csv
import os
from collections import defaultdict

from .harness import is_baseline, ratio_to_baseline


def latest_rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    latest: dict[tuple, dict] = {}
    for row in rows:  # later rows win
        latest[(row["kernel"], row["provider"], row["mode"], row["metric"], row["x"], row["device"])] = row
    return list(latest.values())


def ratios(rows: list[dict]) -> dict[tuple, dict[tuple, float]]:
    """{(kernel, mode, metric, device): {(x, provider): ratio}}; time and rates: speed-up over the baseline,
    memory: ours / baseline."""
    base = {(r["kernel"], r["mode"], r["metric"], r["x"], r["device"]): float(r["p50"])
            for r in rows if is_baseline(r["provider"])}
    out: dict[tuple, dict[tuple, float]] = defaultdict(dict)
    for r in rows:
        if is_baseline(r["provider"]):
            continue
        got = ratio_to_baseline(r["metric"], float(r["p50"]),
                                base.get((r["kernel"], r["mode"], r["metric"], r["x"], r["device"]), 0.0))
        if got is not None:
            out[(r["kernel"], r["mode"], r["metric"], r["device"])][(r["x"], r["provider"])] = got[0]
    return out


def plot(csv_path: str, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    table = ratios(latest_rows(csv_path))
    keys = list(table)
    for (kernel, mode, metric, device), values in sorted(table.items()):
        sizes = sorted({x for x, _ in values})
        providers = sorted({p for _, p in values})
        fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(sizes) * max(1, len(providers)) / 2, 3.2))
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            xs = [j + i * width for j in range(len(sizes))]
            ax.bar(xs, [values.get((s, provider), 0.0) for s in sizes], width=width, label=provider)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(sizes))])
        ax.set_xticklabels(sizes, fontsize=7)
        label = "memory / baseline memory" if metric == "memory" else "speed-up vs baseline (x)"
        ax.set_ylabel(label, fontsize=8)
        ax.set_title(f"{kernel} {mode} {metric}\n{device}", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        devices = sorted({k[3] for k in keys if k[:3] == (kernel, mode, metric)})
        tag = "" if len(devices) == 1 else f"-{devices.index(device)}"
        path = os.path.join(out_dir, f"{kernel}-{mode}-{metric}{tag}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written

"""Evaluate a reward or cost model on a preference set (the reference's ``evaluate/reward`` and ``evaluate/cost``).

Reward: ``accuracy`` = mean[R(better) > R(worse)], ``reward_mean`` / ``reward_std`` over all scored responses.
Cost: ``accuracy`` = mean[C(unsafer) > C(safer)], ``accuracy_sign`` = fraction of responses whose cost sign matches
its safety label, ``cost_mean`` / ``cost_std``.  With ``--output_dir`` the metrics go to ``eval_results.json`` and
every pair's scores to ``scores.jsonl``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass

import torch

from ..data import PreferenceDataset, SafetyPreferenceDataset, load_tokenizer
from ..data.batching import batches, to_device
from ..loading import check_vocab, load_model, require_score_head
from ..models.attention import BACKENDS as ATTN_BACKENDS
from ..models.checkpoint import MODEL_BACKENDS
from ..options import ConfigError, option
from ..runtime import apply_tf32, resolve_device, seed_everything
from ..scores import collect_end_scores, load_normalizer, pair_metrics, read_score_info, score_forward


@dataclass
class ScoreEvalConfig:
    """``saferlhf-fast score``."""

    model_name_or_path: str | None = option(None, "score model folder (from `saferlhf-fast rm` / `cm`)", required=True)
    datasets: list[str] = option([], "NAME[:PROPORTION[:PATH]] ... preference rows to score", required=True)
    score_type: str | None = option(None, "reward or cost (default: read from the model folder)",
                                choices=["reward", "cost"])
    tokenizer_name_or_path: str | None = option(None, "tokenizer folder (default: the model folder)")
    max_length: int = option(512, "maximum sequence length (longer sequences are truncated)")
    per_device_eval_batch_size: int = option(16, "batch size")
    seed: int = option(42, "seed for dataset proportions")
    fp16: bool = option(False, "fp16 autocast")
    bf16: bool = option(False, "bf16 autocast")
    tf32: bool | None = option(None, "allow TF32 matmuls on CUDA")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    backend: str = option("auto", "model implementation: native, hf (transformers) or auto (native when the "
                                  "architecture is ours)", choices=list(MODEL_BACKENDS))
    attn_backend: str | None = option(None, "attention backend of the model", choices=list(ATTN_BACKENDS))
    output_dir: str | None = option(None, "write eval_results.json and scores.jsonl here")
    trust_remote_code: bool = option(False, "accepted for compatibility")

    @property
    def command(self) -> str:
        return "score"

    def validate(self) -> None:
        if not self.model_name_or_path or not self.datasets:
            raise ConfigError("missing required option(s): --model_name_or_path and --datasets")
        if self.per_device_eval_batch_size < 1 or self.max_length < 2:
            raise ConfigError("--per_device_eval_batch_size must be >= 1 and --max_length >= 2")


def _folder_score_type(path: str) -> str:
    """``score_type`` of a score-model folder: score_normalizer.json, else config.json (the reference's field)."""
    score_type = read_score_info(path).get("score_type")
    config_path = os.path.join(path, "config.json")
    if score_type is None and os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            score_type = json.load(f).get("score_type")
    if score_type is None:
        raise ConfigError(f"{path}: unknown score type (neither score_normalizer.json nor config.json names one): "
                          "pass --score_type reward|cost")
    if score_type not in ("reward", "cost"):
        raise ConfigError(f"{path}: score_type {score_type!r} is not a reward or cost model: pass --score_type "
                          "reward|cost")
    return score_type


def evaluate_score_model(cfg: ScoreEvalConfig) -> dict:
    path = cfg.model_name_or_path
    if not os.path.isdir(path):
        raise ConfigError(f"--model_name_or_path {path}: no such folder")
    score_type = cfg.score_type or _folder_score_type(path)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    apply_tf32(cfg.tf32)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or path, cfg.max_length)
    check_vocab(tokenizer, cfg.tokenizer_name_or_path or path, "model_name_or_path", path)
    dataset_class = PreferenceDataset if score_type == "reward" else SafetyPreferenceDataset
    dataset = dataset_class(cfg.datasets, tokenizer, cfg.max_length, seed=cfg.seed, flag="--datasets")
    require_score_head("model_name_or_path", path, "rm` / `cm")
    model = load_model(path, "score", cfg.attn_backend, device, cfg.backend).eval()
    normalizer = load_normalizer(path)
    if normalizer is not None:
        normalizer = normalizer.to(device)
    dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None

    @torch.no_grad()
    def end_scores(batch):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            _, end = score_forward(model, batch["input_ids"], batch["attention_mask"])
        end = end.float()
        return normalizer(end) if normalizer is not None else end

    stream = (to_device(b, device) for b in batches(dataset, list(range(len(dataset))),
                                                     cfg.per_device_eval_batch_size, dataset.collator()))
    first, second, sign = collect_end_scores(stream, end_scores)
    metrics = pair_metrics(score_type, first, second, sign, prefix="")
    metrics["num_pairs"] = len(dataset)
    print(f"{score_type} model {path} on {', '.join(cfg.datasets)} ({len(dataset)} pairs): "
          + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    if cfg.output_dir:
        _write_outputs(cfg, score_type, metrics, first, second, sign)
    return metrics


def write_into(output_dir: str, write) -> None:
    """``write(folder)`` into a temporary folder inside ``output_dir``, then every file moved into place: nothing is
    written beside ``output_dir``, and nothing half-written is left in it (nor the folder, when this call made it)."""
    created = not os.path.isdir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=output_dir)
    try:
        write(tmp)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    except BaseException:
        shutil.rmtree(output_dir if created else tmp, ignore_errors=True)
        raise
    os.rmdir(tmp)


def _write_outputs(cfg, score_type, metrics, first, second, sign) -> None:
    write_into(cfg.output_dir, lambda tmp: _write_files(tmp, cfg, score_type, metrics, first, second, sign))


def _write_files(tmp, cfg, score_type, metrics, first, second, sign) -> None:
    with open(os.path.join(tmp, "eval_results.json"), "w", encoding="utf-8") as f:
        json.dump({"score_type": score_type, "config": asdict(cfg), "metrics": metrics}, f, indent=2)
    names = ("better", "worse") if score_type == "reward" else ("safer", "unsafer")
    with open(os.path.join(tmp, "scores.jsonl"), "w", encoding="utf-8") as f:
        for i in range(first.shape[0]):
            row = {"index": i, names[0]: float(first[i]), names[1]: float(second[i])}
            if sign is not None:
                row[f"{names[0]}_is_safe"] = bool(sign[0, i] < 0)
                row[f"{names[1]}_is_safe"] = bool(sign[1, i] < 0)
            f.write(json.dumps(row) + "\n")

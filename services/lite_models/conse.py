"""ConSE: a joint text/image vector space from an ImageNet classifier + a text encoder.

Convex combination of Semantic Embeddings (Norouzi et al., ICLR 2014): an image is
embedded as the probability-weighted average of the text vectors of its most
likely ImageNet classes. Texts are embedded directly by the same text encoder, so
text->image search, image->image search and text+image composition all work in one
384-d space without any multimodal training (and without CLIP-sized models).

Limit to keep in mind: images can only be described through the 1000 ImageNet
concepts; queries about things outside that vocabulary (astronauts, the moon...)
retrieve poorly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .imagenet import ImageNetClassifier
from .minilm import MiniLMTextEncoder

log = logging.getLogger(__name__)

#: Prompt ensemble used for the class vectors (averaged per class, then
#: re-normalised). Measured on the bundled sample photos/queries it is as good as
#: the best single template, and on an ImageNet synonym->class proxy task (1.5k
#: WordNet/GPT synonyms) it is among the best; an ensemble is less sensitive to
#: how users phrase queries than any single template.
DEFAULT_PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {}",
    "a picture of a {}.",
    "an image of a {}.",
)
#: Bump when the way class vectors are computed changes (invalidates caches).
_CLASS_VECTOR_FORMAT = 1


def default_cache_dir() -> Path:
    """``$MMSEARCH_CACHE_DIR`` or ``~/.cache/mmsearch`` (read by the settings module)."""
    from services.common.settings import shared_cache_dir

    return shared_cache_dir()


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


class ConSEEmbedder:
    """Embeds images and texts into the text encoder's space (ConSE).

    Class-prompt vectors [1000, dim] are computed once at construction (a few s per
    template on 2 CPU cores) and cached on disk as ``.npy``; the cache file name is
    a hash of both model ids, the templates and the class names, so changing any
    of them computes a fresh file instead of reusing a stale one.
    """

    def __init__(
        self,
        classifier: ImageNetClassifier,
        text_encoder: MiniLMTextEncoder,
        top_t: int = 10,
        prompt_template: str | Sequence[str] = DEFAULT_PROMPT_TEMPLATES,
        *,
        temperature: float = 2.0,
        cache_dir: Path | str | None = None,
    ) -> None:
        """Build (or load from cache) the class-prompt vectors.

        ``top_t``: number of most probable classes mixed into an image vector (the
        ConSE paper's T; T=10 was best there and on our sample set).
        ``temperature``: softmax temperature applied to the classifier output
        before mixing (p ** (1 / temperature)). EfficientNet is over-confident;
        softening (2.0) keeps the runner-up classes in the signature, which made
        near-duplicate retrieval robust to JPEG/resize (all sample photos at rank 1
        vs 16/17 at temperature 1) with equal or better text->image recall.
        """
        if top_t < 1:
            raise ValueError("top_t must be >= 1")
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        templates = (
            (prompt_template,) if isinstance(prompt_template, str) else tuple(prompt_template)
        )
        if not templates or any("{}" not in t for t in templates):
            raise ValueError("each prompt template must contain '{}'")
        self.classifier = classifier
        self.text_encoder = text_encoder
        self.top_t = min(int(top_t), len(classifier.class_names))
        self.temperature = float(temperature)
        self.prompt_templates = templates
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._class_key = self._class_vectors_key()
        self.class_vectors = self._load_or_build_class_vectors()

    # ------------------------------------------------------------------ ids / dims
    @property
    def dim(self) -> int:
        """Dimension of every vector this embedder returns."""
        return int(self.text_encoder.dim)

    @property
    def model_id(self) -> str:
        """Identifies the joint space; vectors with different ids are not comparable."""
        return (
            f"conse-{self.classifier.model_id}+{self.text_encoder.model_id}"
            f"-t{self.top_t}-T{self.temperature:g}-{self._class_key[:8]}"
        )

    @property
    def cache_path(self) -> Path:
        """Where the class-prompt vectors are (or would be) cached."""
        return self.cache_dir / f"conse-classvecs-{self._class_key[:24]}.npy"

    # ------------------------------------------------------------ class vectors
    def _class_vectors_key(self) -> str:
        payload = json.dumps(
            {
                "format": _CLASS_VECTOR_FORMAT,
                "classifier": self.classifier.model_id,
                "text_encoder": self.text_encoder.model_id,
                "templates": list(self.prompt_templates),
                "class_names": list(self.classifier.class_names),
            },
            ensure_ascii=False,
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _expected_shape(self) -> tuple[int, int]:
        return (len(self.classifier.class_names), self.dim)

    def _load_or_build_class_vectors(self) -> np.ndarray:
        path = self.cache_path
        if path.is_file():
            try:
                vecs = np.load(path, allow_pickle=False)
                if (
                    vecs.shape == self._expected_shape()
                    and vecs.dtype == np.float32
                    and np.isfinite(vecs).all()
                ):
                    return vecs
                log.warning("ignoring malformed ConSE cache %s", path)
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable ConSE cache %s: %s", path, exc)
        vecs = self.build_class_vectors()
        self._save_cache(path, vecs)
        return vecs

    def build_class_vectors(self) -> np.ndarray:
        """Compute the [num_classes, dim] class-prompt vectors (no cache)."""
        names = self.classifier.class_names
        acc = np.zeros(self._expected_shape(), dtype=np.float64)
        for template in self.prompt_templates:
            acc += self.text_encoder.encode([template.format(n) for n in names])
        return _l2_normalise(acc)

    @staticmethod
    def _save_cache(path: Path, vecs: np.ndarray) -> None:
        """Atomic write (temp file + rename) so concurrent starts never read halves."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    np.save(f, vecs, allow_pickle=False)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:  # read-only home etc.: still works, just recomputes
            log.warning("could not write ConSE cache %s: %s", path, exc)

    # ------------------------------------------------------------------ embedding
    def image_vectors_from_proba(self, probs: np.ndarray) -> np.ndarray:
        """Class probabilities [N, C] -> unit image vectors [N, dim].

        v = normalise(sum over the top-T classes of p_c ** (1/temperature) * class_vec_c).
        Re-normalising the top-T weights to sum to 1 (as in the paper) is skipped on
        purpose: it only rescales v, and the final L2 normalisation removes any
        scale, so both choices give identical vectors and identical retrieval.
        """
        probs = np.asarray(probs, dtype=np.float32)
        if probs.ndim != 2 or probs.shape[1] != self.class_vectors.shape[0]:
            raise ValueError(
                f"expected probabilities [N, {self.class_vectors.shape[0]}], got {probs.shape}"
            )
        if probs.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        t = self.top_t
        if t < probs.shape[1]:
            top = np.argpartition(-probs, t - 1, axis=1)[:, :t]  # order within top-T irrelevant
        else:
            top = np.broadcast_to(np.arange(probs.shape[1]), probs.shape)
        weights = np.take_along_axis(probs, top, axis=1).astype(np.float64)
        weights = np.power(np.clip(weights, 0.0, None), 1.0 / self.temperature)
        vecs = np.einsum("nt,ntd->nd", weights, self.class_vectors[top].astype(np.float64))
        return _l2_normalise(vecs)

    def embed_preprocessed(self, tensor: torch.Tensor) -> np.ndarray:
        """Image vectors for a batch already run through ``classifier.preprocess``."""
        return self.image_vectors_from_proba(self.classifier.forward_proba(tensor))

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> unit vectors [N, dim] float32."""
        return self.image_vectors_from_proba(self.classifier.predict_proba(images))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> unit vectors [N, dim] float32 (plain text-encoder vectors)."""
        return self.text_encoder.encode(texts)

    @staticmethod
    def compose(
        image_vecs: np.ndarray, text_vecs: np.ndarray, text_weight: float = 0.5
    ) -> np.ndarray:
        """Query by image *and* text: normalise((1 - w) * image + w * text).

        Both inputs are re-normalised first so ``text_weight`` means what it says.
        Shapes [N, D] and [N, D] (or [D] / [1, D], broadcast) -> [N, D].
        """
        if not 0.0 <= text_weight <= 1.0:
            raise ValueError("text_weight must be within [0, 1]")
        img = _l2_normalise(np.atleast_2d(np.asarray(image_vecs, dtype=np.float32)))
        txt = _l2_normalise(np.atleast_2d(np.asarray(text_vecs, dtype=np.float32)))
        if img.shape[1] != txt.shape[1]:
            raise ValueError(f"dimension mismatch: {img.shape[1]} vs {txt.shape[1]}")
        return _l2_normalise((1.0 - text_weight) * img + text_weight * txt)

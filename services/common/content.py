"""What the models embed: a text, an image, or an image with a text instruction (composed).

Plain data shared by every service's domain code; `convert.py` maps it to and from the
protobuf messages at the transport edge.
"""
from __future__ import annotations

from dataclasses import dataclass

from services.common.intake import ImageRef


@dataclass(frozen=True)
class TextContent:
    text: str


@dataclass(frozen=True)
class ImageContent:
    image: ImageRef


@dataclass(frozen=True)
class ComposedContent:
    image: ImageRef
    instruction: str
    instruction_weight: float = 0.0  # 0 = backend default


Content = TextContent | ImageContent | ComposedContent

"""Protobuf <-> domain conversions for the shared message types (mmsearch.common.v1)."""
from __future__ import annotations

import numpy as np

from mmsearch.common.v1 import types_pb2
from services.common.content import ComposedContent, Content, ImageContent, TextContent
from services.common.errors import InvalidInput
from services.common.intake import ImageRef


def image_ref_from_proto(msg: types_pb2.Image) -> ImageRef:
    source = msg.WhichOneof("source")
    if source == "uri":
        return ImageRef(uri=msg.uri)
    if source == "data":
        return ImageRef(data=msg.data)
    raise InvalidInput("image is missing (set image.data or image.uri)")


def content_from_proto(msg: types_pb2.Content) -> Content:
    kind = msg.WhichOneof("kind")
    if kind == "text":
        return TextContent(msg.text)
    if kind == "image":
        return ImageContent(image_ref_from_proto(msg.image))
    if kind == "composed":
        if not msg.composed.HasField("image"):
            raise InvalidInput("composed query has no image (composed.image is required)")
        weight = msg.composed.instruction_weight
        if not 0.0 <= weight <= 1.0:
            raise InvalidInput(f"composed.instruction_weight must be in [0, 1], got {weight}")
        return ComposedContent(image_ref_from_proto(msg.composed.image), msg.composed.instruction, weight)
    raise InvalidInput("content is empty (set text, image or composed)")


def content_to_proto(content: Content) -> types_pb2.Content:
    def image(ref: ImageRef) -> types_pb2.Image:
        return types_pb2.Image(uri=ref.uri) if ref.uri else types_pb2.Image(data=ref.data or b"")

    if isinstance(content, TextContent):
        return types_pb2.Content(text=content.text)
    if isinstance(content, ImageContent):
        return types_pb2.Content(image=image(content.image))
    return types_pb2.Content(
        composed=types_pb2.Composed(
            image=image(content.image),
            instruction=content.instruction,
            instruction_weight=content.instruction_weight,
        )
    )


def embedding_to_proto(vector: np.ndarray) -> types_pb2.Embedding:
    return types_pb2.Embedding(values=vector.astype(np.float32, copy=False).tolist())


def embedding_from_proto(msg: types_pb2.Embedding) -> np.ndarray:
    return np.asarray(msg.values, dtype=np.float32)

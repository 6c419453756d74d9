"""The Search service as the gateway sees it: one table built from the proto descriptor.

Every method of `mmsearch.search.v1.Search` becomes an HTTP route with its request and
response classes, so RPCs and fields added to search.proto flow through without code here.
JSON follows the protobuf JSON mapping (google.protobuf.json_format): lowerCamelCase
names (proto names accepted too), enums by name, 64-bit integers as strings, bytes as
base64, unknown fields refused. Errors follow grpc-gateway: the gRPC status becomes an HTTP
status and a `google.rpc.Status`-shaped body `{"code", "message", "details"}`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from mmsearch.search.v1 import search_pb2

SERVICE = search_pb2.DESCRIPTOR.services_by_name["Search"]

# grpc-gateway's runtime.HTTPStatusFromCode.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


class HttpError(Exception):
    """An error answer: HTTP status plus the gRPC code and message of the body."""

    def __init__(self, status: int, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    @classmethod
    def from_grpc(cls, code: grpc.StatusCode, message: str) -> HttpError:
        return cls(HTTP_STATUS.get(code, 500), code, message)

    @classmethod
    def invalid(cls, message: str) -> HttpError:
        return cls(400, grpc.StatusCode.INVALID_ARGUMENT, message)

    @classmethod
    def too_large(cls, message: str) -> HttpError:
        # 413 (not grpc-gateway's 429 for RESOURCE_EXHAUSTED): the body, not the server's
        # load, is the problem, and retrying the same body will not help.
        return cls(413, grpc.StatusCode.INVALID_ARGUMENT, message)

    def body(self) -> dict[str, Any]:
        return status_body(self.code, self.message)


def status_body(code: grpc.StatusCode, message: str) -> dict[str, Any]:
    return {"code": code.value[0], "message": message, "details": []}


def from_rpc_error(e: grpc.aio.AioRpcError) -> HttpError:
    return HttpError.from_grpc(e.code(), e.details() or e.code().name)


@dataclass(frozen=True)
class Method:
    """One RPC: its gRPC path, shape and message classes, and its HTTP path."""

    name: str
    path: str  # /mmsearch.search.v1.Search/Search
    http_path: str  # /v1/search
    request_cls: type[Message]
    response_cls: type[Message]
    client_streaming: bool
    server_streaming: bool
    doc: str


def _kebab(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def _method(m: MethodDescriptor) -> Method:
    return Method(
        name=m.name,
        path=f"/{SERVICE.full_name}/{m.name}",
        http_path=f"/v1/{_kebab(m.name)}",
        request_cls=GetMessageClass(m.input_type),
        response_cls=GetMessageClass(m.output_type),
        client_streaming=m.client_streaming,
        server_streaming=m.server_streaming,
        doc=_leading_comment(m),
    )


def _leading_comment(m: MethodDescriptor) -> str:
    """The method's comment from search.proto (the descriptor has no source info at run
    time, so it is read from the .proto when it ships next to the code)."""
    return _PROTO_COMMENTS.get(m.name, "")


def _read_proto_comments() -> dict[str, str]:
    from pathlib import Path

    proto = Path(__file__).resolve().parents[2] / "protos" / "mmsearch" / "search" / "v1" / "search.proto"
    try:
        text = proto.read_text(encoding="utf-8")
    except OSError:
        return {}
    out: dict[str, str] = {}
    for match in re.finditer(r"((?:[ \t]*//[^\n]*\n)+)[ \t]*rpc\s+(\w+)", text):
        lines = [re.sub(r"^\s*//\s?", "", line) for line in match.group(1).splitlines()]
        out[match.group(2)] = " ".join(line for line in lines if line)
    return out


_PROTO_COMMENTS = _read_proto_comments()
METHODS: dict[str, Method] = {m.name: _method(m) for m in SERVICE.methods}


def parse_json(text: str | bytes, cls: type[Message], what: str = "request body") -> Message:
    """A message from its JSON form; a clear INVALID_ARGUMENT for bad JSON or wrong types."""
    message = cls()
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise HttpError.invalid(f"{what} is not UTF-8: {e}") from None
    if not text.strip():
        return message  # an empty body is the empty message (e.g. StatsRequest)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise HttpError.invalid(f"{what} is not valid JSON: {e}") from None
    except RecursionError:
        raise HttpError.invalid(f"{what} is nested too deeply") from None
    if not isinstance(value, dict):
        raise HttpError.invalid(
            f"{what} must be a JSON object ({cls.DESCRIPTOR.full_name}), not {type(value).__name__}"
        )
    try:
        json_format.ParseDict(value, message)
    except json_format.ParseError as e:
        raise HttpError.invalid(f"{what}: {e}") from None
    except RecursionError:
        raise HttpError.invalid(f"{what} is nested too deeply") from None
    return message


def to_json(message: Message) -> dict[str, Any]:
    """grpc-gateway's default output: camelCase names, every field (zeros and empty lists
    included, so clients need no defaults), enums by name."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


# --- JSON Schema of the messages, for the OpenAPI document ------------------------------

_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    # The JSON mapping writes 64-bit integers as strings (and reads numbers too).
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_SINT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FieldDescriptor.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}


def schema_name(d: Descriptor) -> str:
    return d.full_name


def json_schemas() -> dict[str, dict[str, Any]]:
    """OpenAPI component schemas for every message the Search methods reach."""
    out: dict[str, dict[str, Any]] = {}

    def visit(d: Descriptor) -> None:
        name = schema_name(d)
        if name in out:
            return
        if d.full_name == "google.protobuf.Timestamp":
            out[name] = {"type": "string", "format": "date-time", "description": "RFC 3339 timestamp"}
            return
        props: dict[str, Any] = {}
        out[name] = {"type": "object", "properties": props, "additionalProperties": False}
        for f in d.fields:
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                visit(f.message_type)
                item: dict[str, Any] = {"$ref": f"#/components/schemas/{schema_name(f.message_type)}"}
            elif f.type == FieldDescriptor.TYPE_ENUM:
                item = {"type": "string", "enum": [v.name for v in f.enum_type.values]}
            else:
                item = dict(_SCALARS[f.type])
            is_repeated = getattr(f, "is_repeated", None)
            repeated = is_repeated if isinstance(is_repeated, bool) else f.label == FieldDescriptor.LABEL_REPEATED
            props[f.json_name] = {"type": "array", "items": item} if repeated else item

    for m in METHODS.values():
        visit(m.request_cls.DESCRIPTOR)
        visit(m.response_cls.DESCRIPTOR)
    out["google.rpc.Status"] = {
        "type": "object",
        "properties": {
            "code": {"type": "integer", "description": "gRPC status code number (3 = INVALID_ARGUMENT, ...)"},
            "message": {"type": "string"},
            "details": {"type": "array", "items": {"type": "object"}},
        },
    }
    return out

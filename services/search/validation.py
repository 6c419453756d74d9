"""Checks on caller input that Milvus would otherwise reject late or not at all."""
from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from services.common.errors import InvalidInput
from services.search import fields as F

_ID = re.compile(r"^[A-Za-z0-9_.:/\-]{1,%d}$" % F.MAX_ID_CHARS)


def check_id(item_id: str) -> str:
    if not _ID.fullmatch(item_id):  # fullmatch: `$` alone would let a trailing newline through
        raise InvalidInput(f"id {item_id[:80]!r} is invalid: use 1 to {F.MAX_ID_CHARS} characters of [A-Za-z0-9_.:/-]")
    return item_id


def _depth(value: Any, limit: int, level: int = 1) -> None:
    if level > limit:
        raise InvalidInput(f"metadata nests deeper than {limit} levels")
    if isinstance(value, dict):
        for v in value.values():
            _depth(v, limit, level + 1)
    elif isinstance(value, list):
        for v in value:
            _depth(v, limit, level + 1)


def parse_metadata(text: str, max_bytes: int, max_depth: int) -> dict[str, Any]:
    if not text:
        return {}
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidInput(f"metadata_json is {size} bytes, more than the limit of {max_bytes}")
    try:
        # Recursion in json is bounded by our depth check; reject NaN/Infinity (not JSON).
        value = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not valid JSON")))
    except RecursionError:
        raise InvalidInput(f"metadata nests deeper than {max_depth} levels") from None
    except ValueError as e:
        raise InvalidInput(f"metadata_json is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"metadata_json must be a JSON object, got {type(value).__name__}")
    _depth(value, max_depth)
    return value


def check_filter(expr: str, max_chars: int) -> str:
    """Length and character limits; Milvus expressions are read-only by construction."""
    if len(expr) > max_chars:
        raise InvalidInput(f"filter is {len(expr)} characters, more than the limit of {max_chars}")
    if any(ord(ch) < 32 and ch not in "\t\n\r" for ch in expr):
        raise InvalidInput("filter contains control characters")
    check_filter_structure(expr)
    return expr.strip()


_CLOSERS = {")": "(", "]": "["}
_RESERVED_IN_FILTERS = {"tenant"}


def check_filter_structure(expr: str) -> None:
    """The server wraps a caller's filter as `tenant == "<t>" and (<filter>)`: that holds
    only if the filter cannot close the parenthesis. So: string literals ('...' or "...",
    backslash escapes) must end, and outside them parentheses and brackets must nest
    properly and all close; the `tenant` field may not be named at all (the server owns
    it; `metadata["tenant"]` is a metadata key and fine)."""
    stack: list[str] = []
    i, n = 0, len(expr)
    while i < n:
        ch = expr[i]
        if ch in "\"'":
            j = i + 1
            while j < n and expr[j] != ch:
                j += 2 if expr[j] == "\\" else 1
            if j >= n:
                raise InvalidInput(f"filter has an unterminated string literal starting at character {i}")
            i = j + 1
            continue
        if ch in "([":
            stack.append(ch)
        elif ch in _CLOSERS:
            if not stack or stack.pop() != _CLOSERS[ch]:
                raise InvalidInput(f"filter closes {ch!r} at character {i} that was never opened")
        elif ch.isalpha() or ch == "_":
            j = i
            while j < n and (expr[j].isalnum() or expr[j] == "_"):
                j += 1
            if expr[i:j].lower() in _RESERVED_IN_FILTERS:
                raise InvalidInput(f"filter may not name the {expr[i:j]!r} field: the server confines every call to "
                                   "the caller's tenant")
            i = j
            continue
        i += 1
    if stack:
        raise InvalidInput(f"filter leaves {len(stack)} parenthesis/bracket(s) open")


def check_vector(values: list[float] | np.ndarray, dimension: int) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    if vector.shape != (dimension,):
        raise InvalidInput(f"query_vector has {vector.size} values, the collection's dimension is {dimension}")
    if not np.all(np.isfinite(vector)):
        raise InvalidInput("query_vector contains NaN or infinity")
    with np.errstate(over="ignore"):
        norm = float(np.linalg.norm(vector))
    if norm == 0.0 or math.isnan(norm):
        raise InvalidInput("query_vector is all zeros")
    if math.isinf(norm):  # finite float32 values whose norm overflows: no similarity is defined
        raise InvalidInput("query_vector values are too large (its norm overflows float32)")
    return vector

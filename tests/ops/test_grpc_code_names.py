"""grpc_code label values are exactly go-grpc-prometheus' (Go's codes.Code.String())."""
from __future__ import annotations

import grpc

from services.common.metrics import GO_CODE_NAMES, code_label

# google.golang.org/grpc/codes, code_string.go: the values go-grpc-prometheus exports.
GO = ["OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
      "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange", "Unimplemented",
      "Internal", "Unavailable", "DataLoss", "Unauthenticated"]


def test_every_status_code_has_its_go_name() -> None:
    assert set(GO_CODE_NAMES) == set(grpc.StatusCode)
    for code in grpc.StatusCode:
        number = code.value[0]
        assert code_label(code) == GO[number] == code_label(number), code


def test_unknown_numbers_read_as_unknown() -> None:
    assert code_label(99) == "Unknown"

from __future__ import annotations

import grpc
import pytest

from micro import errors
from micro._grpc_errors import GRPC_TO_HTTP, grpc_status_for
from micro.errors import MicroError, NotFound, RemoteError, error_for_code


def test_every_grpc_status_code_is_mapped() -> None:
    assert set(GRPC_TO_HTTP) == set(grpc.StatusCode)


@pytest.mark.parametrize("code", [400, 401, 403, 404, 405, 408, 409, 413, 429, 500, 501, 502, 503, 504])
def test_each_code_rebuilds_its_own_class_through_the_wire_form(code: int) -> None:
    original = error_for_code(code, "detail", id="svc")
    rebuilt = MicroError.from_dict(original.to_dict())
    assert type(rebuilt) is type(original) is not RemoteError
    assert (rebuilt.code, rebuilt.id, rebuilt.detail) == (code, "svc", "detail")
    assert GRPC_TO_HTTP[grpc_status_for(original)] in {code, 400, 409, 429, 503, 408, 501}


def test_an_unknown_code_becomes_a_remote_error_keeping_the_code() -> None:
    error = MicroError.from_dict({"id": "x", "code": 418, "detail": "teapot"})
    assert isinstance(error, RemoteError)
    assert error.code == 418
    assert error.status == "I'm a Teapot"


def test_wire_form_is_micros() -> None:
    assert NotFound("gone", id="store").to_dict() == {
        "id": "store",
        "code": 404,
        "detail": "gone",
        "status": "Not Found",
    }


def test_all_is_sorted_and_complete() -> None:
    assert errors.__all__ == sorted(errors.__all__)
    public = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, MicroError)}
    assert public <= set(errors.__all__)

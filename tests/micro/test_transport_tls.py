"""TLS in the client transport: CA files, and what a failed handshake is turned into."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from micro._grpc_errors import error_from_rpc
from micro.errors import ConnectError, SetupError, TLSError
from micro.transport import GrpcTransport

PREFIX = "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.5:8081: "


class Failed(grpc.RpcError):
    """An RpcError as grpc raises it when no connection could be made."""

    def __init__(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


def _error(details: str, trust: str = "the CA file ca.pem") -> ConnectError:
    error = error_from_rpc(Failed(PREFIX + details), address="10.0.0.5:8081", trust=trust)
    assert isinstance(error, ConnectError)
    return error


# The details are grpc's own, as it reports each failure.
@pytest.mark.parametrize(
    ("details", "message"),
    [
        (
            "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:"
            "OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK",
            "the TLS certificate of 10.0.0.5:8081 is not trusted by the CA file ca.pem "
            "(unable to get local issuer certificate): give the CA certificate that signed it with --ca-file",
        ),
        (
            "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:"
            "OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired: OK",
            "the TLS certificate of 10.0.0.5:8081 has expired: renew it on that server",
        ),
        (
            "Custom verification check failed with error: UNAUTHENTICATED: "
            "Hostname Verification Check failed.",
            "the TLS certificate of 10.0.0.5:8081 is not issued for that name",
        ),
        (
            "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:"
            "OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification context: OK",
            "10.0.0.5:8081 does not speak TLS",
        ),
        (
            "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: something new",
            "the TLS handshake with 10.0.0.5:8081 failed (UNKNOWN: ipv4:10.0.0.5:8081: Tls handshake failed",
        ),
    ],
)
def test_handshake_failures_become_tls_errors_saying_what_to_do(details: str, message: str) -> None:
    error = _error(details)
    assert isinstance(error, TLSError)
    assert error.address == "10.0.0.5:8081"
    assert message in error.detail


def test_a_plaintext_channel_closed_by_the_server_suggests_tls() -> None:
    error = _error("Socket closed", trust="")
    assert isinstance(error, TLSError)
    assert "if it serves TLS, connect with TLS" in error.detail


def test_a_refused_connection_stays_a_connect_error() -> None:
    for trust in ("", "this machine's trusted CAs"):
        error = _error("Failed to connect to remote host: Connection refused", trust=trust)
        assert type(error) is ConnectError
        assert error.detail == "failed to connect to 10.0.0.5:8081"


def test_a_ca_file_implies_tls_and_names_what_is_trusted(tmp_path: Path) -> None:
    assert GrpcTransport("h:1").secure is False
    assert GrpcTransport("h:1", secure=True).ca_file is None
    transport = GrpcTransport("h:1", ca_file=tmp_path / "ca.pem")
    assert (transport.secure, transport.ca_file) == (True, str(tmp_path / "ca.pem"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the CA file {path} (No such file or directory)"),
        (b"hello", "holds no PEM certificate"),
    ],
)
def test_a_bad_ca_file_is_a_setup_error_naming_it(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    transport = GrpcTransport("127.0.0.1:1", ca_file=path)
    with pytest.raises(SetupError) as caught:
        asyncio.run(transport.unary("/a.B/C", b"", metadata=(), timeout=1))
    assert message.format(path=path) in caught.value.detail
    assert "the CA that signed the server's certificate" in caught.value.detail

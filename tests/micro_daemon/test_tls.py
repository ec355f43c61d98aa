"""The daemon with ``--tls-cert/--tls-key``: TLS on the gRPC and API ports, plaintext on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from micro import __version__
from micro.client import Client
from micro.credentials import StaticToken
from micro.errors import SetupError, TLSError
from micro.home import Home
from micro.store import StoreClient
from micro.testing.pytest import DaemonThread
from micro.transport import GrpcTransport
from micro_daemon.settings import Settings
from micro_daemon.tls import load_tls
from tests._tls import Certificates, make_certificates


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "tls")


@pytest.fixture
def tls_server(micro_home: Path, certs: Certificates) -> Iterator[DaemonThread]:
    with DaemonThread(Home.from_env(), tls_cert=str(certs.cert), tls_key=str(certs.key)) as daemon:
        yield daemon


def _owner() -> str:
    return str(json.loads(Home.from_env().owner_token.read_text())["access_token"])


async def _write_read(transport: GrpcTransport, token: str | None = None) -> bytes:
    client = Client(transport, credentials=StaticToken(token) if token else None)
    try:
        store = StoreClient(client)
        await store.write("k", b"v")
        return (await store.read("k"))[0].value
    finally:
        await client.close()


def test_the_grpc_port_speaks_tls_to_a_client_trusting_the_ca(
    tls_server: DaemonThread, certs: Certificates
) -> None:
    transport = GrpcTransport(tls_server.address, ca_file=certs.ca)
    assert transport.secure
    assert asyncio.run(_write_read(transport, _owner())) == b"v"
    localhost = tls_server.address.replace("127.0.0.1", "localhost")
    assert asyncio.run(_write_read(GrpcTransport(localhost, ca_file=certs.ca), _owner())) == b"v"


def test_the_state_file_says_tls_and_names_a_plaintext_loopback_port(tls_server: DaemonThread) -> None:
    state = Home.from_env().read_state()
    assert state is not None
    assert state.tls is True
    assert state.address == tls_server.address
    assert state.client_address != state.address
    assert state.client_address.startswith("127.0.0.1:")
    # This machine's services and CLI keep plaintext there, with the owner's credentials found by themselves.
    client = Client(GrpcTransport(state.client_address))
    try:
        assert asyncio.run(_roundtrip(client)) == b"v"
    finally:
        asyncio.run(client.close())


async def _roundtrip(client: Client) -> bytes:
    store = StoreClient(client)
    await store.write("local", b"v")
    return (await store.read("local"))[0].value


def test_a_plaintext_daemon_publishes_no_tls(micro_server: DaemonThread) -> None:
    state = Home.from_env().read_state()
    assert state is not None
    assert (state.tls, state.client_address) == (False, micro_server.address)


def test_a_certificate_no_trusted_root_signed_is_refused_with_a_hint(
    tls_server: DaemonThread, certs: Certificates
) -> None:
    with pytest.raises(TLSError, match=r"not trusted by this machine's trusted CAs .*--ca-file"):
        asyncio.run(_write_read(GrpcTransport(tls_server.address, secure=True)))
    with pytest.raises(TLSError, match=rf"not trusted by the CA file {certs.other_ca}"):
        asyncio.run(_write_read(GrpcTransport(tls_server.address, ca_file=certs.other_ca)))


def test_a_plaintext_client_on_the_tls_port_is_told_to_use_tls(tls_server: DaemonThread) -> None:
    with pytest.raises(TLSError, match=r"closed the connection before answering: if it serves TLS.*--tls"):
        asyncio.run(_write_read(GrpcTransport(tls_server.address)))


def test_a_tls_client_on_a_plaintext_daemon_is_told_it_does_not_speak_tls(
    micro_server: DaemonThread, certs: Certificates
) -> None:
    with pytest.raises(TLSError, match="does not speak TLS"):
        asyncio.run(_write_read(GrpcTransport(micro_server.address, ca_file=certs.ca)))


def test_the_gateway_serves_https_with_the_same_certificate(
    tls_server: DaemonThread, certs: Certificates
) -> None:
    state = Home.from_env().read_state()
    assert state is not None
    context = ssl.create_default_context(cafile=str(certs.ca))
    with urllib.request.urlopen(f"https://{state.api_address}/", context=context, timeout=10) as response:
        assert json.loads(response.read()) == {"version": __version__}
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(
            f"https://{state.api_address}/", context=ssl.create_default_context(), timeout=10
        )
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://{state.api_address}/", timeout=10)


# -- bad files ------------------------------------------------------------------------------------------


def _settings(cert: Path | str, key: Path | str) -> Settings:
    return Settings.load(tls_cert=str(cert), tls_key=str(key))


def test_no_files_means_plaintext(micro_home: Path) -> None:
    assert load_tls(Settings.load()) is None


def test_a_good_pair_loads(micro_home: Path, certs: Certificates) -> None:
    files = load_tls(_settings(certs.cert, certs.key))
    assert files is not None
    assert files.cert == certs.cert.read_bytes()
    assert files.ssl_context() is not None


@pytest.mark.parametrize("given", ["tls_cert", "tls_key"])
def test_one_file_without_the_other_is_refused(micro_home: Path, certs: Certificates, given: str) -> None:
    flag, other = ("--tls-cert", "--tls-key") if given == "tls_cert" else ("--tls-key", "--tls-cert")
    with pytest.raises(SetupError, match=f"{flag} is set but {other} is not: TLS needs both"):
        Settings.load(**{given: str(certs.cert)})


def _bad_files(certs: Certificates, case: str) -> tuple[Path, Path, str]:
    missing = certs.cert.parent / "missing.pem"
    text = certs.cert.parent / "notes.txt"
    text.write_text("not a certificate\n")
    if case == "missing cert":
        return missing, certs.key, f"cannot read the TLS certificate {missing} (no such file)"
    if case == "missing key":
        return certs.cert, missing, f"cannot read the TLS key {missing} (no such file)"
    if case == "folder":
        return (
            certs.cert.parent,
            certs.key,
            f"cannot read the TLS certificate {certs.cert.parent} (it is a folder)",
        )
    if case == "cert not pem":
        return text, certs.key, f"the TLS certificate {text} is not a PEM certificate"
    if case == "key not pem":
        return certs.cert, text, f"the TLS key {text} is not a PEM private key"
    if case == "cert given as key":
        return certs.cert, certs.cert, f"the TLS key {certs.cert} is not a PEM private key"
    assert case == "other key"
    return certs.cert, certs.other_key, f"the TLS key {certs.other_key} does not belong to the certificate"


@pytest.mark.parametrize(
    "case",
    [
        "missing cert",
        "missing key",
        "folder",
        "cert not pem",
        "key not pem",
        "cert given as key",
        "other key",
    ],
)
def test_bad_files_are_refused_naming_the_file(micro_home: Path, certs: Certificates, case: str) -> None:
    cert, key, message = _bad_files(certs, case)
    with pytest.raises(SetupError) as caught:
        load_tls(_settings(cert, key))
    assert message in caught.value.detail
    assert "--tls" in caught.value.detail


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_key_is_refused(micro_home: Path, certs: Certificates) -> None:
    certs.key.chmod(0)
    with pytest.raises(SetupError, match=f"cannot read the TLS key {certs.key} \\(Permission denied\\)"):
        load_tls(_settings(certs.cert, certs.key))


def test_an_encrypted_key_is_refused_with_the_command_that_decrypts_it(
    micro_home: Path, certs: Certificates
) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(certs.key.read_bytes(), password=None)
    encrypted = certs.key.with_name("encrypted.pem")
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(SetupError, match=f"the TLS key {encrypted} is encrypted: .*openssl pkey"):
        load_tls(_settings(certs.cert, encrypted))


def test_micro_server_refuses_bad_files_with_exit_code_9(micro_cli, certs: Certificates) -> None:
    micro_cli("server", "--tls-cert", str(certs.cert)).assert_failure(9, err="TLS needs both")
    missing = certs.cert.parent / "nope.key"
    micro_cli("server", "--tls-cert", str(certs.cert), "--tls-key", str(missing)).assert_failure(
        9, err="Cannot read the TLS key"
    )
    assert Home.from_env().read_state() is None


def test_the_background_daemon_exits_9_on_bad_files(
    micro_home: Path, certs: Certificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    from micro_daemon.__main__ import main

    monkeypatch.setenv("MICRO_TLS_CERT", str(certs.cert))
    monkeypatch.setenv("MICRO_TLS_KEY", str(certs.other_key))
    assert main() == 9


# -- services run by a TLS daemon ---------------------------------------------------------------------


async def test_a_service_run_by_a_tls_daemon_reaches_it_over_loopback(
    micro_home: Path, certs: Certificates, tmp_path: Path
) -> None:
    from micro.runtime import RuntimeClient
    from micro_daemon.app import Daemon
    from tests.micro_daemon.runtime.test_manager import SERVICE, Status, create, pids, settled, source

    daemon = Daemon(Settings.load(tls_cert=str(certs.cert), tls_key=str(certs.key)), Home.from_env())
    await daemon.start()
    client = Client(GrpcTransport(daemon.address, ca_file=certs.ca), credentials=StaticToken(_owner()))
    try:
        runtime = RuntimeClient(client)
        await create(runtime, source(tmp_path, SERVICE))
        service = await settled(runtime)
        assert service.status == Status.RUNNING, service.metadata.get("error")
        assert len(await pids(client)) == 1  # registered through the plaintext loopback port
        reply = await client.call_json("svc", "Echo.Call", b'{"text": "over TLS"}')
        assert json.loads(reply) == {"text": "over TLS"}
    finally:
        await client.close()
        await daemon.stop(grace=1)

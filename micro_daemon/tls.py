"""The daemon's TLS certificate and key: checked once at start, then served on the gRPC and API ports.

Every problem with the files (one given without the other, missing, unreadable,
not PEM, an encrypted key, a key that does not belong to the certificate) is a
``SetupError`` naming the file and what to do about it.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from micro.errors import SetupError

if TYPE_CHECKING:
    import ssl

    import grpc

    from micro_daemon.settings import Settings

__all__ = ["HINT", "TlsFiles", "load_tls"]

log = logging.getLogger("micro.server")

HINT = "give a PEM certificate with --tls-cert (MICRO_TLS_CERT) and its key with --tls-key (MICRO_TLS_KEY)"


@dataclass(frozen=True)
class TlsFiles:
    """A certificate chain and its private key, both PEM, known to belong together."""

    cert_path: Path
    key_path: Path
    cert: bytes
    key: bytes

    def grpc_credentials(self) -> grpc.ServerCredentials:
        import grpc

        return grpc.ssl_server_credentials([(self.key, self.cert)])

    def ssl_context(self) -> ssl.SSLContext:
        import ssl

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_path, self.key_path)
        return context

    def relay_ssl_context(self) -> ssl.SSLContext:
        """The gRPC port's context: gRPC clients insist that the server chooses HTTP/2 by ALPN."""
        context = self.ssl_context()
        context.set_alpn_protocols(["h2"])
        return context


def load_tls(settings: Settings) -> TlsFiles | None:
    """The TLS files of ``settings``, checked; ``None`` when neither is set (plaintext)."""
    if not settings.tls:  # Settings.validate refused one file without the other
        return None
    cert_path, key_path = settings.tls_cert.strip(), settings.tls_key.strip()
    cert, key = _read(Path(cert_path), "certificate"), _read(Path(key_path), "key")
    chain = _certificates(Path(cert_path), cert)
    _check_key(Path(key_path), key, chain[0], Path(cert_path))
    _warn_if_outdated(Path(cert_path), chain[0])
    return TlsFiles(Path(cert_path), Path(key_path), cert, key)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        reason = "no such file"
    except IsADirectoryError:
        reason = "it is a folder"
    except OSError as exc:
        reason = exc.strerror or str(exc)
    raise SetupError(f"cannot read the TLS {what} {path} ({reason}): {HINT}", id="micro.server")


def _certificates(path: Path, data: bytes) -> list[Any]:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise SetupError(
            f"the TLS certificate {path} is not a PEM certificate (-----BEGIN CERTIFICATE-----): {HINT}",
            id="micro.server",
        ) from None


def _check_key(path: Path, data: bytes, leaf: Any, cert_path: Path) -> None:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SetupError(
            f"the TLS key {path} is encrypted: give it without a passphrase "
            f"(openssl pkey -in {path} -out plain.key), readable only by you",
            id="micro.server",
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise SetupError(
            f"the TLS key {path} is not a PEM private key (-----BEGIN PRIVATE KEY-----): {HINT}",
            id="micro.server",
        ) from None
    public = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*public) != leaf.public_key().public_bytes(*public):
        raise SetupError(
            f"the TLS key {path} does not belong to the certificate {cert_path} "
            "(the first certificate of the file must be the server's own): "
            "give the matching pair with --tls-cert and --tls-key",
            id="micro.server",
        )


def _warn_if_outdated(path: Path, leaf: Any) -> None:
    now = datetime.datetime.now(datetime.UTC)
    if leaf.not_valid_after_utc < now:
        log.warning(
            "the TLS certificate %s expired on %s: clients will refuse it", path, leaf.not_valid_after_utc
        )
    elif leaf.not_valid_before_utc > now:
        log.warning("the TLS certificate %s is valid only from %s", path, leaf.not_valid_before_utc)

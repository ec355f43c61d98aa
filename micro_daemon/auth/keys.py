"""The RSA key pair that signs access tokens.

``KeyPair.load_or_create(config_dir)`` takes the keys from, in order:

1. ``MICRO_AUTH_PRIVATE_KEY`` (a PEM, or the base64 of one, as Micro writes
   it), when set and non-empty; the key files are then neither read nor
   written. ``MICRO_AUTH_PUBLIC_KEY``, if set too, must be its public half.
   Daemons that share a store share their keys this way.
2. ``<config_dir>/auth/private_key.pem``, which must be readable by its owner
   only; its public half is written to ``public_key.pem`` alongside.
3. A new key pair, written there: the directory 0700, both files 0600.

Keys are 3072-bit: generating one takes ~130 ms here (2048: ~50 ms, Micro's
4096: ~500 ms), once per installation, and signs a token in ~0.7 ms, paid
once per login or refresh, while verifying costs about the same as 2048
(~90 µs, once per token thanks to the verifier's cache). 3072 bits is
NIST's size for keys meant to stay secure past 2030 (128-bit strength).
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from micro.auth import PUBLIC_KEY_ENV, pem_bytes
from micro.errors import SetupError
from micro.home import write_private

__all__ = ["KEY_BITS", "KEY_DIR", "MIN_KEY_BITS", "PRIVATE_KEY_ENV", "PUBLIC_KEY_ENV", "KeyPair"]

PRIVATE_KEY_ENV = "MICRO_AUTH_PRIVATE_KEY"
KEY_BITS = 3072
MIN_KEY_BITS = 2048
KEY_DIR = "auth"
PRIVATE_FILE = "private_key.pem"
PUBLIC_FILE = "public_key.pem"


@dataclass(frozen=True)
class KeyPair:
    """The daemon's signing key and the PEM of its public half (what services verify with)."""

    private_key: rsa.RSAPrivateKey
    public_pem: bytes

    @classmethod
    def from_private_key(cls, key: rsa.RSAPrivateKey) -> KeyPair:
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(key, public)

    @classmethod
    def generate(cls, bits: int = KEY_BITS) -> KeyPair:
        """A fresh pair kept nowhere (for tests and throwaway daemons)."""
        return cls.from_private_key(rsa.generate_private_key(public_exponent=65537, key_size=bits))

    @classmethod
    def load_or_create(
        cls, config_dir: str | os.PathLike[str], environ: Mapping[str, str] | None = None
    ) -> KeyPair:
        """The pair from the environment, else from ``<config_dir>/auth``, created there if missing.

        Raises ``SetupError`` for a key that is not an RSA private key of at
        least 2048 bits, a public key that does not match it, or a private key
        file that group or others may read.
        """
        env = os.environ if environ is None else environ
        private = env.get(PRIVATE_KEY_ENV, "")
        if private:
            pair = cls.from_private_key(_parse_private(private.encode(), f"variable {PRIVATE_KEY_ENV}"))
            _check_public_matches(pair, env.get(PUBLIC_KEY_ENV, ""))
            return pair
        if env.get(PUBLIC_KEY_ENV):
            raise SetupError(
                f"{PUBLIC_KEY_ENV} is set but {PRIVATE_KEY_ENV} is not: the server signs tokens, "
                "so give it the private key too (or unset both to use the key files)",
                id="auth",
            )
        directory = Path(config_dir) / KEY_DIR
        path = directory / PRIVATE_FILE
        pair = _read(path) if path.exists() else _create(directory)
        public_path = directory / PUBLIC_FILE
        if not public_path.exists() or public_path.read_bytes() != pair.public_pem:
            write_private(public_path, pair.public_pem)
        return pair

    @classmethod
    def from_pem(cls, data: bytes, source: str, *, ours: bool = False) -> KeyPair:
        """The pair of an unencrypted PEM private key; ``SetupError`` naming ``source`` if it is not one.

        ``ours``: micro generated and wrote it, so OpenSSL's consistency check of the key (220 ms
        for 3072 bits here, paid at every start) is skipped; a key given by the user is checked.
        """
        return cls.from_private_key(_parse_private(data, source, check=not ours))

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _parse_private(data: bytes, source: str, *, check: bool = True) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(
            pem_bytes(data), password=None, unsafe_skip_rsa_key_validation=not check
        )
    except (ValueError, TypeError) as exc:  # TypeError: an encrypted key
        raise SetupError(
            f"the auth private key in {source} is not an unencrypted PEM private key ({exc})", id="auth"
        ) from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SetupError(f"the auth private key in {source} is {type(key).__name__}, not RSA", id="auth")
    if key.key_size < MIN_KEY_BITS:
        raise SetupError(
            f"the auth private key in {source} has {key.key_size} bits; use at least {MIN_KEY_BITS}",
            id="auth",
        )
    return key


def _check_public_matches(pair: KeyPair, public: str) -> None:
    if not public:
        return
    from micro.auth import load_public_key

    if load_public_key(public).public_numbers() != pair.private_key.public_key().public_numbers():
        raise SetupError(
            f"{PUBLIC_KEY_ENV} is not the public half of {PRIVATE_KEY_ENV}: set both from the same pair",
            id="auth",
        )


def _read(path: Path) -> KeyPair:
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name != "nt" and mode & 0o077:
        raise SetupError(
            f"auth private key file {path} may be read by other users (mode {mode:o}); "
            f"run `chmod 600 {path}` and start again",
            id="auth",
        )
    return KeyPair.from_pem(path.read_bytes(), f"file {path}", ours=True)


def _create(directory: Path) -> KeyPair:
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)  # mkdir's mode is masked by the umask
    pair = KeyPair.generate()
    path = directory / PRIVATE_FILE
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{PRIVATE_FILE}.")  # created 0600
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(pair.private_pem())
            file.flush()
            os.fsync(file.fileno())
        # A hard link never replaces a key another daemon, starting at the same moment, already uses.
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read(path)
        except OSError:  # a filesystem without hard links
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return pair

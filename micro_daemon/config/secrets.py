"""AES-256-GCM encryption of secret config values, with the key kept private.

The key is 32 random bytes, written base64-encoded. ``SecretBox.load_or_create``
takes it from, in order:

1. the environment variable ``MICRO_CONFIG_SECRET_KEY`` (base64 of 32 bytes),
   when set and non-empty; the key file is then neither read nor created;
2. the key file (Micro's ``~/.micro/config_secret_key``), created on first use
   with mode 0600, inside a directory created with mode 0700 if missing (an
   existing directory is left as it is). A key file that other users may
   read is refused.

Losing the key makes every stored secret unreadable: back it up with the store.
"""

from __future__ import annotations

import base64
import os
import stat
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from micro.errors import BadRequest, InternalServerError

__all__ = ["KEY_ENV", "KEY_SIZE", "SecretBox"]

KEY_ENV = "MICRO_CONFIG_SECRET_KEY"
KEY_SIZE = 32
_NONCE_SIZE = 12


class SecretBox:
    """Encrypts and decrypts strings with one AES-256-GCM key (a ``tree.Cipher``)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"an AES-256 key is {KEY_SIZE} bytes, not {len(key)}")
        self._aead = AESGCM(key)

    @classmethod
    def generate(cls) -> SecretBox:
        """A box with a fresh random key, kept nowhere (for tests and throwaway daemons)."""
        return cls(AESGCM.generate_key(bit_length=KEY_SIZE * 8))

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> SecretBox:
        """The box of ``MICRO_CONFIG_SECRET_KEY``, else of the key file at ``path``, created if missing.

        Raises ``InternalServerError`` if the key is not base64 of 32 bytes or
        the key file is readable by group or others.
        """
        encoded = os.environ.get(KEY_ENV)
        if encoded:
            return cls(_decode_key(encoded, f"environment variable {KEY_ENV}", _NEW_KEY_HINT))
        key_file = Path(path)
        return cls(_read_key(key_file) if key_file.exists() else _create_key(key_file))

    def encrypt(self, plaintext: str) -> str:
        """Base64 of a random nonce followed by the ciphertext and tag of ``plaintext``."""
        nonce = os.urandom(_NONCE_SIZE)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), None)
        return base64.b64encode(nonce + sealed).decode("ascii")

    def decrypt(self, token: str) -> str:
        """The plaintext of ``token``; raises ``BadRequest`` if it was altered or sealed with another key."""
        try:
            raw = base64.b64decode(token, validate=True)
            return self._aead.decrypt(raw[:_NONCE_SIZE], raw[_NONCE_SIZE:], None).decode()
        except (ValueError, InvalidTag) as exc:  # binascii and Unicode errors are ValueErrors
            raise BadRequest(
                "config secret could not be decrypted: it was altered, or encrypted with another key; "
                "set the secret again (or restore the key it was set with)",
                id="config",
            ) from exc


_NEW_KEY_HINT = "set it to the base64 of 32 random bytes, e.g. `head -c 32 /dev/urandom | base64`"
_FILE_KEY_HINT = "restore it from a backup (secrets set with another key can't be read)"


def _decode_key(text: str, source: str, hint: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        key = b""
    if len(key) != KEY_SIZE:
        raise InternalServerError(
            f"the config secret key in {source} is not base64 of {KEY_SIZE} bytes; {hint}", id="config"
        )
    return key


def _read_key(path: Path) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name != "nt" and mode & 0o077:  # Windows has no POSIX permission bits
        raise InternalServerError(
            f"config secret key file {path} may be read by other users (mode {mode:o}); "
            f"run `chmod 600 {path}` and start again",
            id="config",
        )
    return _decode_key(path.read_text(), f"key file {path}", _FILE_KEY_HINT)


def _create_key(path: Path) -> bytes:
    _make_private_dir(path.parent)
    key = AESGCM.generate_key(bit_length=KEY_SIZE * 8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as file:
            file.write(base64.b64encode(key).decode("ascii") + "\n")
            file.flush()
            os.fsync(file.fileno())
        if not _publish(Path(tmp), path):
            return _read_key(path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return key


def _publish(tmp: Path, path: Path) -> bool:
    # A hard link, unlike os.replace, never overwrites a key that another daemon
    # starting at the same moment has just written and may already use.
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links
        os.replace(tmp, path)
    return True


def _make_private_dir(directory: Path) -> None:
    if directory.exists():
        return
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)  # mkdir's mode is masked by the umask


def _fsync_dir(directory: Path) -> None:
    # Secrets sealed with a key whose directory entry was lost in a crash are lost too.
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

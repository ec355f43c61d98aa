"""Account secrets, hashed with scrypt and checked in constant time.

A stored hash reads ``scrypt$<n>$<r>$<p>$<salt>$<hash>`` (salt and hash in
base64), so the cost can be raised later while older hashes still check.
One hash takes ~40 ms and 16 MiB at the default cost, which is why the
``async`` methods run it in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os

__all__ = ["SCRYPT_N", "SecretHasher"]

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
_MAX_N = 2**17  # a tampered record must not make us allocate gigabytes
_MAX_MEMORY = 2 * 128 * SCRYPT_R * _MAX_N


class SecretHasher:
    """Hashes and checks secrets with scrypt at cost ``n`` (``r=8, p=1``, 16-byte salt)."""

    def __init__(self, n: int = SCRYPT_N) -> None:
        self.n = n
        self._decoy: str | None = None

    def hash(self, secret: str) -> str:
        salt = os.urandom(SALT_BYTES)
        digest = _scrypt(secret, salt, self.n, SCRYPT_R, SCRYPT_P)
        return "$".join(["scrypt", str(self.n), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(digest)])

    def check(self, secret: str, stored: str) -> bool:
        """Whether ``secret`` matches ``stored``; ``False`` for a hash in an unknown format."""
        try:
            scheme, n, r, p, salt, digest = stored.split("$")
            if scheme != "scrypt" or not 1 < int(n) <= _MAX_N:
                return False
            expected = base64.b64decode(digest, validate=True)
            actual = _scrypt(secret, base64.b64decode(salt, validate=True), int(n), int(r), int(p))
        except ValueError:
            return False
        return hmac.compare_digest(actual, expected)

    async def hash_async(self, secret: str) -> str:
        return await asyncio.to_thread(self.hash, secret)

    async def check_async(self, secret: str, stored: str) -> bool:
        return await asyncio.to_thread(self.check, secret, stored)

    async def check_nothing_async(self, secret: str) -> bool:
        """Spend the time of a check against no account, so an unknown id answers as slowly as a known one."""
        if self._decoy is None:
            self._decoy = await self.hash_async(os.urandom(16).hex())
        await self.check_async(secret, self._decoy)
        return False


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, dklen=HASH_BYTES, maxmem=_MAX_MEMORY)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")

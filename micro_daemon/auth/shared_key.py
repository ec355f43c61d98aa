"""One signing key for every daemon of a platform, kept in the shared store, encrypted.

Daemons that share a store (the ``platform`` profile) share accounts, so a
token one of them signs must verify at all of them. Without a key given in
``MICRO_AUTH_PRIVATE_KEY``, the first daemon to start generates the pair and
stores its private half encrypted with ``MICRO_CONFIG_SECRET_KEY`` (which
every daemon of a platform must share anyway); the others read it. A record
written with ``if_version=0`` settles two daemons starting at once: the
loser reads the winner's key.
"""

from __future__ import annotations

import asyncio

from micro.errors import BadRequest, Conflict, NotFound, SetupError
from micro_daemon.auth.keys import KeyPair
from micro_daemon.auth.tokens import DATABASE, TABLE
from micro_daemon.config.secrets import KEY_ENV, SecretBox
from micro_daemon.store.backend import Record, StoreBackend

__all__ = ["RECORD_KEY", "load_or_create_shared"]

RECORD_KEY = "signing-key"


async def load_or_create_shared(store: StoreBackend, box: SecretBox) -> KeyPair:
    """The platform's key pair from ``store``, created there (encrypted with ``box``) if absent."""
    try:
        return _decrypt(box, (await store.get(DATABASE, TABLE, RECORD_KEY)).value)
    except NotFound:
        pass
    pair = await asyncio.to_thread(KeyPair.generate)
    record = Record(key=RECORD_KEY, value=box.encrypt(pair.private_pem().decode()).encode())
    try:
        await store.put(DATABASE, TABLE, record, if_version=0)
    except Conflict:  # another daemon stored its pair first: use that one
        return _decrypt(box, (await store.get(DATABASE, TABLE, RECORD_KEY)).value)
    return pair


def _decrypt(box: SecretBox, value: bytes) -> KeyPair:
    try:
        pem = box.decrypt(value.decode())
    except BadRequest as exc:
        raise SetupError(
            f"the platform's auth key in the shared store cannot be decrypted with this daemon's {KEY_ENV}: "
            "give every daemon of the platform the same key",
            id="auth",
        ) from exc
    return KeyPair.from_pem(pem.encode(), "the shared store", ours=True)

"""The platform's signing key: made once in the shared store, read by every daemon with the same key."""

from __future__ import annotations

import asyncio

import pytest

from micro.errors import SetupError
from micro_daemon.auth.shared_key import RECORD_KEY, load_or_create_shared
from micro_daemon.auth.tokens import DATABASE, TABLE
from micro_daemon.config.secrets import SecretBox
from micro_daemon.store.backends.memory import MemoryBackend


def public(pair: object) -> bytes:
    return pair.public_pem  # type: ignore[attr-defined, no-any-return]


async def test_every_daemon_gets_the_first_ones_key() -> None:
    store, box = MemoryBackend(), SecretBox.generate()
    first = await load_or_create_shared(store, box)
    again = await load_or_create_shared(store, box)
    assert public(again) == public(first)


async def test_daemons_starting_at_once_settle_on_one_key() -> None:
    store, box = MemoryBackend(), SecretBox.generate()
    pairs = await asyncio.gather(*(load_or_create_shared(store, box) for _ in range(3)))
    assert len({public(p) for p in pairs}) == 1


async def test_the_key_is_kept_encrypted() -> None:
    store, box = MemoryBackend(), SecretBox.generate()
    pair = await load_or_create_shared(store, box)
    stored = (await store.get(DATABASE, TABLE, RECORD_KEY)).value
    assert b"PRIVATE KEY" not in stored
    assert pair.private_pem() not in stored


async def test_another_secret_key_is_a_clear_setup_error() -> None:
    store = MemoryBackend()
    await load_or_create_shared(store, SecretBox.generate())
    with pytest.raises(SetupError, match="same key"):
        await load_or_create_shared(store, SecretBox.generate())

from __future__ import annotations

import asyncio
import base64
import threading

import pytest

from micro_daemon.auth.passwords import SCRYPT_N, SecretHasher


def test_the_default_cost_is_scrypt_n16384_r8_p1_with_a_16_byte_salt():
    stored = SecretHasher().hash("hunter2")
    scheme, n, r, p, salt, digest = stored.split("$")
    assert (scheme, int(n), int(r), int(p)) == ("scrypt", SCRYPT_N, 8, 1) == ("scrypt", 2**14, 8, 1)
    assert (len(base64.b64decode(salt)), len(base64.b64decode(digest))) == (16, 32)
    assert "hunter2" not in stored


def test_a_secret_checks_against_its_hash_only():
    hasher = SecretHasher(n=2**4)
    stored = hasher.hash("hunter2")
    assert hasher.check("hunter2", stored)
    assert not hasher.check("hunter3", stored)
    assert not hasher.check("", stored)
    assert hasher.hash("hunter2") != stored  # a fresh salt every time


def test_hashes_made_at_another_cost_still_check():
    stored = SecretHasher(n=2**5).hash("hunter2")
    assert SecretHasher(n=2**4).check("hunter2", stored)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "plain",
        "bcrypt$1$2$3$4$5",
        "scrypt$x$8$1$AAAA$AAAA",
        "scrypt$1073741824$8$1$AAAA$AAAA",
        "scrypt$16$8$1$!!$AAAA",
    ],
)
def test_unknown_or_tampered_hashes_never_match(stored):
    assert not SecretHasher().check("anything", stored)


async def test_hashing_runs_off_the_event_loop():
    hasher = SecretHasher(n=2**4)
    threads = set()
    real_hash = hasher.hash

    def spy(secret: str) -> str:
        threads.add(threading.current_thread())
        return real_hash(secret)

    hasher.hash = spy  # type: ignore[method-assign]
    stored = await hasher.hash_async("hunter2")
    assert threading.main_thread() not in threads
    assert await hasher.check_async("hunter2", stored)
    assert not await hasher.check_nothing_async("hunter2")
    await asyncio.sleep(0)

from __future__ import annotations

import base64
import os
import re
import stat

import pytest

from micro.errors import BadRequest, InternalServerError
from micro_daemon.config import secrets
from micro_daemon.config.secrets import KEY_ENV, SecretBox


@pytest.fixture(autouse=True)
def no_key_in_env(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_encrypt_round_trips_with_a_fresh_nonce():
    box = SecretBox.generate()
    first, second = box.encrypt("hunter2 ✓"), box.encrypt("hunter2 ✓")
    assert first != second
    assert "hunter2" not in first
    assert box.decrypt(first) == box.decrypt(second) == "hunter2 ✓"


def tampered(token: str) -> str:
    raw = bytearray(base64.b64decode(token))
    raw[-1] ^= 1
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize("damage", [tampered, lambda t: "not base64!", lambda t: t[:8], lambda t: ""])
def test_altered_ciphertext_is_refused(damage):
    box = SecretBox.generate()
    with pytest.raises(BadRequest, match="could not be decrypted") as info:
        box.decrypt(damage(box.encrypt("hunter2")))
    assert info.value.id == "config"


def test_another_key_cannot_decrypt():
    with pytest.raises(BadRequest):
        SecretBox.generate().decrypt(SecretBox.generate().encrypt("hunter2"))


def test_keys_are_32_bytes():
    with pytest.raises(ValueError, match="32 bytes"):
        SecretBox(b"short")


def test_the_key_file_is_created_private_and_reused(tmp_path):
    path = tmp_path / "home" / ".micro" / "config_secret_key"
    token = SecretBox.load_or_create(path).encrypt("hunter2")
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert len(base64.b64decode(path.read_text())) == 32
    assert SecretBox.load_or_create(path).decrypt(token) == "hunter2"
    assert os.listdir(path.parent) == ["config_secret_key"]


def test_an_existing_directory_is_left_as_it_is(tmp_path):
    tmp_path.chmod(0o755)
    SecretBox.load_or_create(tmp_path / "key")
    assert mode(tmp_path) == 0o755
    assert mode(tmp_path / "key") == 0o600


@pytest.mark.parametrize("loose", [0o640, 0o604, 0o660])
def test_a_key_file_others_can_read_is_refused(tmp_path, loose):
    path = tmp_path / "key"
    SecretBox.load_or_create(path)
    path.chmod(loose)
    with pytest.raises(InternalServerError, match=re.escape(f"chmod 600 {path}")) as info:
        SecretBox.load_or_create(path)
    assert info.value.id == "config"


def test_a_corrupt_key_file_is_refused(tmp_path):
    path = tmp_path / "key"
    path.write_text("not a key\n")
    path.chmod(0o600)
    with pytest.raises(InternalServerError, match="not base64 of 32 bytes"):
        SecretBox.load_or_create(path)


def test_a_daemon_losing_the_creation_race_adopts_the_winners_key(tmp_path):
    path = tmp_path / "key"
    winner = SecretBox.load_or_create(path)
    assert secrets._create_key(path) == base64.b64decode(path.read_text())
    assert SecretBox.load_or_create(path).decrypt(winner.encrypt("x")) == "x"
    assert os.listdir(tmp_path) == ["key"]


def test_the_key_may_come_from_the_environment(tmp_path, monkeypatch):
    key = os.urandom(32)
    monkeypatch.setenv(KEY_ENV, base64.b64encode(key).decode())
    box = SecretBox.load_or_create(tmp_path / "key")
    assert not (tmp_path / "key").exists()
    assert SecretBox(key).decrypt(box.encrypt("hunter2")) == "hunter2"


@pytest.mark.parametrize("value", ["nope", base64.b64encode(b"16 bytes only!!!").decode()])
def test_a_bad_key_in_the_environment_is_refused(tmp_path, monkeypatch, value):
    monkeypatch.setenv(KEY_ENV, value)
    with pytest.raises(InternalServerError, match=KEY_ENV):
        SecretBox.load_or_create(tmp_path / "key")

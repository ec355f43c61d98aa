from __future__ import annotations

import base64
import os
import re
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from micro.errors import SetupError
from micro_daemon.auth import keys as keys_module
from micro_daemon.auth.keys import KEY_BITS, PRIVATE_KEY_ENV, PUBLIC_KEY_ENV, KeyPair


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def fast_keys(monkeypatch, keys):
    """Key generation hands out the session's pair, so these tests spend no time on RSA."""
    monkeypatch.setattr(KeyPair, "generate", classmethod(lambda cls, bits=KEY_BITS: keys))
    return keys


def test_a_new_pair_is_written_private_and_reused(tmp_path, fast_keys):
    config = tmp_path / "config"
    pair = KeyPair.load_or_create(config, environ={})
    directory = config / "auth"
    assert mode(directory) == 0o700
    assert mode(directory / "private_key.pem") == 0o600
    assert mode(directory / "public_key.pem") == 0o600
    assert (directory / "public_key.pem").read_bytes() == pair.public_pem
    assert sorted(os.listdir(directory)) == ["private_key.pem", "public_key.pem"]
    again = KeyPair.load_or_create(config, environ={})
    assert again.public_pem == pair.public_pem
    assert again.private_pem() == pair.private_pem()


def test_generated_keys_are_3072_bit_rsa():
    assert KEY_BITS == 3072
    assert KeyPair.generate(2048).private_key.key_size == 2048


def test_a_missing_public_file_is_written_again(tmp_path, fast_keys):
    pair = KeyPair.load_or_create(tmp_path, environ={})
    (tmp_path / "auth" / "public_key.pem").unlink()
    KeyPair.load_or_create(tmp_path, environ={})
    assert (tmp_path / "auth" / "public_key.pem").read_bytes() == pair.public_pem


@pytest.mark.parametrize("loose", [0o640, 0o604, 0o644, 0o660])
def test_a_private_key_file_others_can_read_is_refused(tmp_path, fast_keys, loose):
    KeyPair.load_or_create(tmp_path, environ={})
    path = tmp_path / "auth" / "private_key.pem"
    path.chmod(loose)
    with pytest.raises(SetupError, match=re.escape(f"chmod 600 {path}")) as info:
        KeyPair.load_or_create(tmp_path, environ={})
    assert info.value.id == "auth"


@pytest.mark.parametrize(
    "encode", [lambda pem: pem, lambda pem: base64.b64encode(pem)], ids=["pem", "base64"]
)
def test_the_environment_overrides_the_files(tmp_path, keys, encode):
    environ = {PRIVATE_KEY_ENV: encode(keys.private_pem()).decode()}
    pair = KeyPair.load_or_create(tmp_path, environ=environ)
    assert pair.public_pem == keys.public_pem
    assert not (tmp_path / "auth").exists()


def test_the_environment_is_read_by_default(tmp_path, keys, monkeypatch):
    monkeypatch.setenv(PRIVATE_KEY_ENV, keys.private_pem().decode())
    monkeypatch.setenv(PUBLIC_KEY_ENV, base64.b64encode(keys.public_pem).decode())
    assert KeyPair.load_or_create(tmp_path).public_pem == keys.public_pem


def test_a_public_key_from_another_pair_is_refused(tmp_path, keys, other_keys):
    environ = {PRIVATE_KEY_ENV: keys.private_pem().decode(), PUBLIC_KEY_ENV: other_keys.public_pem.decode()}
    with pytest.raises(SetupError, match="not the public half"):
        KeyPair.load_or_create(tmp_path, environ=environ)


def test_a_public_key_alone_is_refused(tmp_path, keys):
    with pytest.raises(SetupError, match=f"{PRIVATE_KEY_ENV} is not"):
        KeyPair.load_or_create(tmp_path, environ={PUBLIC_KEY_ENV: keys.public_pem.decode()})


def pem(key) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not a key", "not an unencrypted PEM private key"),
        (pem(ec.generate_private_key(ec.SECP256R1())), "not RSA"),
        (pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)), "1024 bits"),
    ],
    ids=["garbage", "ec", "small"],
)
def test_unusable_private_keys_are_refused(tmp_path, value, message):
    with pytest.raises(SetupError, match=message):
        KeyPair.load_or_create(tmp_path, environ={PRIVATE_KEY_ENV: value})


def test_a_key_written_meanwhile_by_another_daemon_wins(tmp_path, keys, other_keys, monkeypatch):
    real_link = os.link

    def link_after_another_daemon(src, dst):
        (tmp_path / "auth" / "private_key.pem").write_bytes(other_keys.private_pem())
        os.chmod(dst, 0o600)
        real_link(src, dst)

    monkeypatch.setattr(KeyPair, "generate", classmethod(lambda cls, bits=KEY_BITS: keys))
    monkeypatch.setattr(keys_module.os, "link", link_after_another_daemon)
    pair = KeyPair.load_or_create(tmp_path, environ={})
    assert pair.public_pem == other_keys.public_pem
    assert sorted(os.listdir(tmp_path / "auth")) == ["private_key.pem", "public_key.pem"]

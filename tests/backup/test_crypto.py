"""Repository key material: sealing chunks, keyed digests and MACs, creating
and opening passphrase-wrapped and key-file keys."""

from __future__ import annotations

import base64
import errno
import json
import os
import stat

import blake3
import pytest

import blksnap.backup.crypto as crypto
from blksnap.backup.crypto import (
    MASTER_KEY_BYTES,
    Keys,
    create_encryption,
    export_key_file,
    open_keys,
    passphrase_from_env,
)
from blksnap.errors import BlksnapError, Exists, InvalidArgument, IOFailure, NotFound

PASS = b"correct horse battery staple"


@pytest.fixture(autouse=True)
def cheap_argon2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Argon2id at a test cost; test_real_argon2_defaults uses the real one."""
    monkeypatch.setattr(crypto, "ARGON2_ITERATIONS", 1)
    monkeypatch.setattr(crypto, "ARGON2_LANES", 1)
    monkeypatch.setattr(crypto, "ARGON2_MEMORY_KIB", 1024)


def master(fill: int | None = None) -> bytes:
    return bytes([fill]) * MASTER_KEY_BYTES if fill is not None else os.urandom(MASTER_KEY_BYTES)


# ---------------------------------------------------------------------------
# Keys


def test_seal_round_trip() -> None:
    keys = Keys.from_master(master())
    payload = os.urandom(5000)
    digest = keys.digest(payload)
    sealed = keys.seal(digest, payload)
    assert len(sealed) == len(payload) + keys.SEAL_OVERHEAD == len(payload) + 28
    assert payload not in sealed
    assert keys.unseal(digest, sealed) == payload
    assert keys.unseal(digest, memoryview(sealed)) == payload
    assert keys.seal(digest, memoryview(payload)) != sealed  # fresh nonce each time


def test_seal_empty_payload() -> None:
    keys = Keys.from_master(master())
    digest = keys.digest(b"")
    assert keys.unseal(digest, keys.seal(digest, b"")) == b""


@pytest.mark.parametrize("position", [0, 11, 12, 100, -1])
def test_unseal_flipped_byte(position: int) -> None:
    keys = Keys.from_master(master())
    payload = os.urandom(200)
    digest = keys.digest(payload)
    sealed = bytearray(keys.seal(digest, payload))
    sealed[position] ^= 0x01
    with pytest.raises(IOFailure) as info:
        keys.unseal(digest, bytes(sealed))
    assert info.value.errno == errno.EIO
    assert f"chunk {digest.hex()}: authentication failed" in info.value.message


def test_unseal_other_digest() -> None:
    keys = Keys.from_master(master())
    payload = b"block contents" * 100
    sealed = keys.seal(keys.digest(payload), payload)
    with pytest.raises(IOFailure):
        keys.unseal(keys.digest(b"another block"), sealed)


def test_unseal_too_short() -> None:
    keys = Keys.from_master(master())
    with pytest.raises(IOFailure):
        keys.unseal(bytes(32), b"x" * 27)
    with pytest.raises(IOFailure):
        keys.unseal(bytes(32), b"")


def test_unseal_other_key() -> None:
    a, b = Keys.from_master(master(1)), Keys.from_master(master(2))
    digest = bytes(32)
    with pytest.raises(IOFailure):
        b.unseal(digest, a.seal(digest, b"secret"))


def test_plain_keys() -> None:
    keys = Keys.plain()
    assert not keys.encrypted
    assert keys.key_id == ""
    assert keys.SEAL_OVERHEAD == 0
    data = b"some data"
    assert keys.digest(data) == blake3.blake3(data).digest()
    assert keys.digest(memoryview(data)) == blake3.blake3(data).digest()
    assert keys.mac(data) == blake3.blake3(data).hexdigest()
    sealed = keys.seal(keys.digest(data), memoryview(data))
    assert type(sealed) is bytes and sealed == data
    assert keys.unseal(keys.digest(data), memoryview(sealed)) == data


def test_encrypted_digest() -> None:
    a, b = Keys.from_master(master(1)), Keys.from_master(master(2))
    assert a.encrypted and b.encrypted
    for data in (b"", b"block", os.urandom(3 * 1024 * 1024)):  # the last one is threaded
        da = a.digest(data)
        assert len(da) == 32
        assert da != blake3.blake3(data).digest()
        assert da != b.digest(data)
        assert da == a.digest(bytearray(data)) == a.digest(memoryview(data))
        assert da == Keys.from_master(master(1)).digest(data)


def test_encrypted_mac() -> None:
    a, b = Keys.from_master(master(1)), Keys.from_master(master(2))
    data = b'{"manifest": 1}'
    mac = a.mac(data)
    assert len(mac) == 64 and int(mac, 16) >= 0
    assert mac != blake3.blake3(data).hexdigest()
    assert mac != b.mac(data)
    assert mac == Keys.from_master(master(1)).mac(data)
    assert mac != a.mac(data + b" ")
    # The MAC key, the chunk-id key and the key id are distinct derivations.
    assert mac != a.digest(data).hex()


def test_key_id() -> None:
    a = Keys.from_master(master(1))
    assert len(a.key_id) == 32 and int(a.key_id, 16) >= 0
    assert a.key_id == Keys.from_master(master(1)).key_id
    assert a.key_id != Keys.from_master(master(2)).key_id


def test_repr_hides_master() -> None:
    m = master()
    keys = Keys.from_master(m)
    text = repr(keys) + str(keys)
    assert m.hex() not in text
    assert base64.b64encode(m).decode() not in text
    assert keys.key_id in repr(keys)
    assert "plain" in repr(Keys.plain())


def test_from_master_wrong_length() -> None:
    with pytest.raises(InvalidArgument):
        Keys.from_master(b"short")


# ---------------------------------------------------------------------------
# Passphrase mode


def test_passphrase_create_and_open() -> None:
    meta, keys = create_encryption(passphrase=PASS)
    assert meta["cipher"] == "aes-256-gcm"
    assert meta["digest"] == "blake3-keyed"
    assert meta["mode"] == "passphrase"
    assert meta["key_id"] == keys.key_id
    assert meta["kdf"] == {
        "name": "argon2id",
        "salt": meta["kdf"]["salt"],
        "iterations": 1,
        "lanes": 1,
        "memory_kib": 1024,
    }
    assert len(base64.b64decode(meta["kdf"]["salt"])) == 16
    assert len(base64.b64decode(meta["nonce"])) == 12
    # The record survives REPO.json.
    meta = json.loads(json.dumps(meta))

    opened = open_keys(meta, passphrase=PASS)
    assert opened.encrypted
    assert opened.key_id == keys.key_id
    payload = os.urandom(1000)
    digest = keys.digest(payload)
    assert opened.digest(payload) == digest
    assert opened.mac(payload) == keys.mac(payload)
    assert opened.unseal(digest, keys.seal(digest, payload)) == payload
    assert keys.unseal(digest, opened.seal(digest, payload)) == payload


def test_passphrase_opens_with_stored_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    meta, keys = create_encryption(passphrase=PASS)
    monkeypatch.setattr(crypto, "ARGON2_ITERATIONS", 2)
    monkeypatch.setattr(crypto, "ARGON2_MEMORY_KIB", 2048)
    assert open_keys(meta, passphrase=PASS).key_id == keys.key_id


def test_two_repositories_have_different_keys() -> None:
    meta_a, a = create_encryption(passphrase=PASS)
    meta_b, b = create_encryption(passphrase=PASS)
    assert a.key_id != b.key_id
    assert meta_a["kdf"]["salt"] != meta_b["kdf"]["salt"]
    assert a.digest(b"x") != b.digest(b"x")


def test_wrong_passphrase() -> None:
    meta, _ = create_encryption(passphrase=PASS)
    with pytest.raises(BlksnapError) as info:
        open_keys(meta, passphrase=b"wrong", where="repository /backup")
    assert info.value.errno == errno.EKEYREJECTED
    assert "the passphrase does not open repository /backup's key" in info.value.message


def test_no_passphrase() -> None:
    meta, _ = create_encryption(passphrase=PASS)
    with pytest.raises(BlksnapError) as info:
        open_keys(meta)
    assert info.value.errno == errno.ENOKEY
    assert "BLKSNAP_PASSPHRASE" in info.value.message
    assert "--key-file FILE" in info.value.message


def test_passphrase_meta_holds_no_master() -> None:
    meta, keys = create_encryption(passphrase=PASS)
    m = keys._master
    assert m is not None
    text = json.dumps(meta)
    for encoded in (
        m.hex(),
        m.hex().upper(),
        base64.b64encode(m).decode(),
        base64.urlsafe_b64encode(m).decode(),
        base64.b64encode(m).decode().rstrip("="),
    ):
        assert encoded not in text
    assert PASS.decode() not in text


def test_passphrase_altered_key_id() -> None:
    meta, _ = create_encryption(passphrase=PASS)
    meta["key_id"] = "0" * 32
    with pytest.raises(BlksnapError) as info:
        open_keys(meta, passphrase=PASS)
    assert info.value.errno == errno.EKEYREJECTED


def test_passphrase_damaged_record() -> None:
    meta, _ = create_encryption(passphrase=PASS)
    broken = dict(meta, wrapped="not base64!")
    with pytest.raises(InvalidArgument):
        open_keys(broken, passphrase=PASS)
    broken = dict(meta, kdf=dict(meta["kdf"], memory_kib=1 << 40))
    with pytest.raises(InvalidArgument):
        open_keys(broken, passphrase=PASS)
    broken = dict(meta)
    del broken["nonce"]
    with pytest.raises(InvalidArgument):
        open_keys(broken, passphrase=PASS)


def test_passphrase_wrapped_tampered() -> None:
    meta, _ = create_encryption(passphrase=PASS)
    wrapped = bytearray(base64.b64decode(meta["wrapped"]))
    wrapped[0] ^= 1
    meta["wrapped"] = base64.b64encode(bytes(wrapped)).decode()
    with pytest.raises(BlksnapError) as info:
        open_keys(meta, passphrase=PASS)
    assert info.value.errno == errno.EKEYREJECTED


def test_passphrase_repository_opens_with_exported_key_file(tmp_path) -> None:
    meta, keys = create_encryption(passphrase=PASS)
    path = str(tmp_path / "exported.key")
    export_key_file(keys._master, path)
    opened = open_keys(meta, key_file=path)
    assert opened.key_id == keys.key_id
    # A key file of another repository is refused, even with the right passphrase.
    _, other = create_encryption(key_file=str(tmp_path / "other.key"))
    with pytest.raises(BlksnapError) as info:
        open_keys(meta, key_file=str(tmp_path / "other.key"), passphrase=PASS)
    assert info.value.errno == errno.EKEYREJECTED
    assert other.key_id in info.value.message


def test_create_needs_exactly_one(tmp_path) -> None:
    with pytest.raises(InvalidArgument):
        create_encryption()
    with pytest.raises(InvalidArgument):
        create_encryption(passphrase=PASS, key_file=str(tmp_path / "k"))
    assert not (tmp_path / "k").exists()
    with pytest.raises(InvalidArgument):
        create_encryption(passphrase=b"")


def test_real_argon2_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()
    assert (crypto.ARGON2_ITERATIONS, crypto.ARGON2_LANES, crypto.ARGON2_MEMORY_KIB) == (
        3,
        4,
        65536,
    )
    meta, keys = create_encryption(passphrase=PASS)
    assert meta["kdf"]["iterations"] == 3
    assert meta["kdf"]["lanes"] == 4
    assert meta["kdf"]["memory_kib"] == 65536
    assert open_keys(meta, passphrase=PASS).key_id == keys.key_id


# ---------------------------------------------------------------------------
# Key-file mode


def test_key_file_create_and_open(tmp_path) -> None:
    path = tmp_path / "repo.key"
    meta, keys = create_encryption(key_file=str(path))
    assert meta == {
        "cipher": "aes-256-gcm",
        "digest": "blake3-keyed",
        "key_id": keys.key_id,
        "mode": "keyfile",
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    body = json.loads(path.read_text())
    assert body["format"] == "blksnap-key"
    assert body["version"] == 1
    assert body["key_id"] == keys.key_id
    assert base64.b64decode(body["key"]) == keys._master

    opened = open_keys(meta, key_file=str(path))
    assert opened.key_id == keys.key_id
    digest = keys.digest(b"chunk")
    assert opened.unseal(digest, keys.seal(digest, b"chunk")) == b"chunk"
    # A passphrase alongside changes nothing.
    assert open_keys(meta, key_file=str(path), passphrase=b"x").key_id == keys.key_id


def test_key_file_mode_0600_under_permissive_umask(tmp_path) -> None:
    old = os.umask(0)
    try:
        create_encryption(key_file=str(tmp_path / "k"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


def test_key_file_of_another_repository(tmp_path) -> None:
    meta, keys = create_encryption(key_file=str(tmp_path / "a.key"))
    _, other = create_encryption(key_file=str(tmp_path / "b.key"))
    with pytest.raises(BlksnapError) as info:
        open_keys(meta, key_file=str(tmp_path / "b.key"), where="repository /r")
    assert info.value.errno == errno.EKEYREJECTED
    assert info.value.message == (
        f"key file {tmp_path / 'b.key'} belongs to another repository "
        f"(key id {other.key_id}, repository /r needs {keys.key_id})"
    )


def test_key_file_missing(tmp_path) -> None:
    meta, _ = create_encryption(key_file=str(tmp_path / "a.key"))
    with pytest.raises(NotFound) as info:
        open_keys(meta, key_file=str(tmp_path / "absent.key"))
    assert info.value.errno == errno.ENOENT
    assert "absent.key" in info.value.message


def test_key_file_not_given(tmp_path) -> None:
    meta, _ = create_encryption(key_file=str(tmp_path / "a.key"))
    with pytest.raises(BlksnapError) as info:
        open_keys(meta, passphrase=PASS)
    assert info.value.errno == errno.ENOKEY
    assert "--key-file FILE" in info.value.message


def test_key_file_exists_on_create(tmp_path) -> None:
    path = tmp_path / "a.key"
    path.write_text("precious")
    with pytest.raises(Exists):
        create_encryption(key_file=str(path))
    assert path.read_text() == "precious"


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",
        '{"format": "something-else"}',
        '{"format": "blksnap-key", "version": 1, "key_id": "00", "key": "AAAA"}',
    ],
)
def test_key_file_bad_contents(tmp_path, text: str) -> None:
    meta, _ = create_encryption(key_file=str(tmp_path / "a.key"))
    bad = tmp_path / "bad.key"
    bad.write_text(text)
    with pytest.raises(InvalidArgument) as info:
        open_keys(meta, key_file=str(bad))
    assert str(bad) in info.value.message


def test_key_file_altered_key(tmp_path) -> None:
    path = tmp_path / "a.key"
    meta, _ = create_encryption(key_file=str(path))
    body = json.loads(path.read_text())
    body["key"] = base64.b64encode(master()).decode()
    path.write_text(json.dumps(body))
    with pytest.raises(InvalidArgument):
        open_keys(meta, key_file=str(path))


# ---------------------------------------------------------------------------
# Records


def test_plain_repository() -> None:
    keys = open_keys(None, passphrase=PASS, key_file="/nonexistent")
    assert not keys.encrypted


@pytest.mark.parametrize(
    "change",
    [{"cipher": "chacha20-poly1305"}, {"digest": "sha256"}, {"mode": "tpm"}],
)
def test_unknown_scheme(tmp_path, change: dict) -> None:
    meta, _ = create_encryption(key_file=str(tmp_path / "a.key"))
    meta.update(change)
    with pytest.raises(BlksnapError) as info:
        open_keys(meta, key_file=str(tmp_path / "a.key"))
    assert info.value.errno == errno.EPROTONOSUPPORT


def test_unknown_kdf() -> None:
    meta, _ = create_encryption(passphrase=PASS)
    meta["kdf"]["name"] = "scrypt"
    with pytest.raises(BlksnapError) as info:
        open_keys(meta, passphrase=PASS)
    assert info.value.errno == errno.EPROTONOSUPPORT


def test_passphrase_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BLKSNAP_PASSPHRASE", raising=False)
    assert passphrase_from_env() is None
    monkeypatch.setenv("BLKSNAP_PASSPHRASE", "pässword")
    assert passphrase_from_env() == "pässword".encode()

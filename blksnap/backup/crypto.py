"""Key material of an encrypted repository (format version 2).

An encrypted repository has one random 32-byte master key. From it come,
by blake3's key derivation mode, the keys that do the work:

* the chunk key: every stored chunk is sealed with AES-256-GCM under it, its
  digest as associated data, so a chunk moved to another digest fails too;
* the chunk-id key: chunk digests are keyed blake3, so they reveal nothing
  about the contents (equal blocks are still stored once);
* the MAC key: manifests and indexes carry a keyed blake3 of their bytes;
* the key id: a public fingerprint that tells which key opens a repository.

The master key itself lives either in the repository's ``REPO.json``, wrapped
by a key derived from a passphrase (Argon2id), or only in a key file that the
user keeps apart from the repository. :func:`create_encryption` makes one,
:func:`open_keys` opens it; an unencrypted repository uses :meth:`Keys.plain`.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import os
import re
import secrets
from typing import Any

import blake3
from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from blksnap.errors import BlksnapError, Exists, InvalidArgument, IOFailure, from_oserror
from blksnap.fileio import fsync_dir

#: Bytes of the master key (and of every key derived from it).
MASTER_KEY_BYTES = 32
#: Bytes of the key id, the public fingerprint of a master key.
KEY_ID_BYTES = 16
#: Bytes of an AES-GCM nonce, and of its tag.
NONCE_BYTES = 12
TAG_BYTES = 16
#: Bytes of the Argon2id salt.
SALT_BYTES = 16

CIPHER = "aes-256-gcm"
DIGEST = "blake3-keyed"
MODE_PASSPHRASE = "passphrase"
MODE_KEYFILE = "keyfile"
KDF = "argon2id"

#: Argon2id cost of a new passphrase-wrapped key. An existing repository is
#: opened with the parameters stored in its record.
ARGON2_ITERATIONS = 3
ARGON2_LANES = 4
ARGON2_MEMORY_KIB = 65536

#: The most a stored record may ask for: a damaged or hostile ``REPO.json``
#: must not make opening it take hours or all the memory.
ARGON2_MAX_ITERATIONS = 64
ARGON2_MAX_LANES = 64
ARGON2_MAX_MEMORY_KIB = 4 * 1024 * 1024

#: Associated data of the wrapped master key.
WRAP_AAD = b"blksnap repository key"

KEY_FILE_FORMAT = "blksnap-key"
KEY_FILE_VERSION = 1
#: A key file is a few hundred bytes; anything much larger is not one.
KEY_FILE_MAX_BYTES = 64 * 1024

#: Environment variable holding the passphrase.
PASSPHRASE_ENV = "BLKSNAP_PASSPHRASE"

# blake3 derive_key contexts: fixed forever, one per derived key.
_CONTEXT_CHUNK = "blksnap 2026-11 repository v2 chunk encryption key"
_CONTEXT_CHUNK_ID = "blksnap 2026-11 repository v2 chunk id key"
_CONTEXT_MAC = "blksnap 2026-11 repository v2 manifest mac key"
_CONTEXT_KEY_ID = "blksnap 2026-11 repository v2 key id"

_KEY_ID_RE = re.compile(r"[0-9a-f]{32}")


def _derive(context: str, master: bytes, length: int = MASTER_KEY_BYTES) -> bytes:
    return blake3.blake3(master, derive_key_context=context).digest(length=length)


def _key_id_of(master: bytes) -> str:
    return _derive(_CONTEXT_KEY_ID, master, KEY_ID_BYTES).hex()


class Keys:
    """Opened key material of a repository. For an unencrypted repository use Keys.plain()."""

    encrypted: bool
    key_id: str

    def __init__(self, master: bytes | None) -> None:
        # Callers use plain() or from_master(); master None means unencrypted.
        self._master = master
        self.encrypted = master is not None
        if master is None:
            self.key_id = ""
            self._chunk_aead: AESGCM | None = None
            self._id_key: bytes | None = None
            self._mac_key: bytes | None = None
        else:
            self.key_id = _key_id_of(master)
            self._chunk_aead = AESGCM(_derive(_CONTEXT_CHUNK, master))
            self._id_key = _derive(_CONTEXT_CHUNK_ID, master)
            self._mac_key = _derive(_CONTEXT_MAC, master)

    @classmethod
    def plain(cls) -> Keys:
        """Keys of an unencrypted repository: plain blake3, chunks stored as they are."""
        return cls(None)

    @classmethod
    def from_master(cls, master: bytes) -> Keys:
        """Keys of an encrypted repository whose master key is ``master``."""
        if not isinstance(master, bytes | bytearray) or len(master) != MASTER_KEY_BYTES:
            raise InvalidArgument(f"a master key is {MASTER_KEY_BYTES} bytes")
        return cls(bytes(master))

    def master(self) -> bytes | None:
        """The master key (None: not encrypted): what the command line hands
        blksnapd to serve an encrypted repository's backups."""
        return self._master

    def __repr__(self) -> str:
        if not self.encrypted:
            return "Keys(plain)"
        return f"Keys(encrypted, key_id={self.key_id})"

    @property
    def SEAL_OVERHEAD(self) -> int:
        """Bytes :meth:`seal` adds to a payload: nonce and tag, 0 when plain."""
        return NONCE_BYTES + TAG_BYTES if self.encrypted else 0

    def digest(self, data: bytes | bytearray | memoryview) -> bytes:
        """The 32-byte digest naming a chunk of ``data``."""
        # One thread: chunks are hashed by several backup threads at once
        # already, and blake3's own threads cost more than they gain at 1 MiB.
        if self._id_key is None:
            return blake3.blake3(data).digest()
        return blake3.blake3(data, key=self._id_key).digest()

    def mac(self, data: bytes) -> str:
        """Hex MAC of a manifest or index (a plain blake3 when unencrypted)."""
        if self._mac_key is None:
            return blake3.blake3(data).hexdigest()
        return blake3.blake3(data, key=self._mac_key).hexdigest()

    def seal(self, digest: bytes, payload: bytes | memoryview) -> bytes:
        """The stored form of the chunk ``digest`` whose contents are ``payload``."""
        if self._chunk_aead is None:
            return bytes(payload)
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._chunk_aead.encrypt(nonce, payload, digest)

    def unseal(self, digest: bytes, sealed: bytes | memoryview) -> bytes:
        """The contents of the stored chunk ``digest``; IOFailure if it does not authenticate."""
        if self._chunk_aead is None:
            return bytes(sealed)
        view = memoryview(sealed)
        try:
            if len(view) < NONCE_BYTES + TAG_BYTES:
                raise InvalidTag
            return self._chunk_aead.decrypt(view[:NONCE_BYTES], view[NONCE_BYTES:], digest)
        except InvalidTag:
            raise IOFailure(
                f"chunk {bytes(digest).hex()}: authentication failed "
                "(damaged, or not encrypted with this repository's key)"
            ) from None


# ---------------------------------------------------------------------------
# Creating


def passphrase_from_env() -> bytes | None:
    """The passphrase in ``BLKSNAP_PASSPHRASE`` (utf-8), None if it is not set."""
    value = os.environ.get(PASSPHRASE_ENV)
    return None if value is None else value.encode("utf-8")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _argon2(passphrase: bytes, salt: bytes, iterations: int, lanes: int, memory_kib: int) -> bytes:
    try:
        kdf = Argon2id(
            salt=salt,
            length=MASTER_KEY_BYTES,
            iterations=iterations,
            lanes=lanes,
            memory_cost=memory_kib,
        )
        return kdf.derive(passphrase)
    except UnsupportedAlgorithm as exc:
        raise BlksnapError(
            f"argon2id is not available in this build of the cryptography library ({exc}): "
            "install a cryptography built with OpenSSL 3.2 or later",
            errno.EPROTONOSUPPORT,
        ) from None


def export_key_file(keys_master: bytes, path: str) -> None:
    """Write the master key ``keys_master`` to a new key file ``path`` (mode 0600)."""
    if len(keys_master) != MASTER_KEY_BYTES:
        raise InvalidArgument(f"a master key is {MASTER_KEY_BYTES} bytes")
    body = {
        "format": KEY_FILE_FORMAT,
        "version": KEY_FILE_VERSION,
        "key_id": _key_id_of(bytes(keys_master)),
        "key": _b64(bytes(keys_master)),
    }
    text = (json.dumps(body, indent=2) + "\n").encode("ascii")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise Exists(
            f"key file {path} already exists: choose another path "
            "(an existing key file is never overwritten)"
        ) from None
    except OSError as exc:
        raise from_oserror(exc, f"key file {path}") from None
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(text)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise from_oserror(exc, f"key file {path}") from None


def create_encryption(
    *, passphrase: bytes | None = None, key_file: str | None = None
) -> tuple[dict, Keys]:
    """A new random master key, for a new repository: its ``REPO.json``
    ``"encryption"`` record and its keys. With ``passphrase`` the record holds
    the master key wrapped by it; with ``key_file`` the key is written to that
    new file only, and the record holds no key material."""
    if (passphrase is None) == (key_file is None):
        raise InvalidArgument(
            "an encrypted repository needs exactly one of a passphrase or a key file: "
            f"pass --key-file FILE or set {PASSPHRASE_ENV}, not both"
        )
    master = secrets.token_bytes(MASTER_KEY_BYTES)
    keys = Keys.from_master(master)
    meta: dict[str, Any] = {"cipher": CIPHER, "digest": DIGEST, "key_id": keys.key_id}
    if key_file is not None:
        export_key_file(master, key_file)
        meta["mode"] = MODE_KEYFILE
        return meta, keys
    assert passphrase is not None
    if not passphrase:
        raise InvalidArgument(f"the passphrase is empty: set {PASSPHRASE_ENV} to a passphrase")
    salt = secrets.token_bytes(SALT_BYTES)
    kek = _argon2(passphrase, salt, ARGON2_ITERATIONS, ARGON2_LANES, ARGON2_MEMORY_KIB)
    nonce = secrets.token_bytes(NONCE_BYTES)
    wrapped = AESGCM(kek).encrypt(nonce, master, WRAP_AAD)
    meta["mode"] = MODE_PASSPHRASE
    meta["kdf"] = {
        "name": KDF,
        "salt": _b64(salt),
        "iterations": ARGON2_ITERATIONS,
        "lanes": ARGON2_LANES,
        "memory_kib": ARGON2_MEMORY_KIB,
    }
    meta["nonce"] = _b64(nonce)
    meta["wrapped"] = _b64(wrapped)
    return meta, keys


# ---------------------------------------------------------------------------
# Opening


def _damaged(where: str, what: str) -> InvalidArgument:
    return InvalidArgument(
        f"{where}'s encryption record in REPO.json is damaged ({what}): "
        "restore REPO.json from a copy"
    )


def _field_b64(record: dict, name: str, where: str, length: int | None = None) -> bytes:
    value = record.get(name)
    if not isinstance(value, str):
        raise _damaged(where, f"{name} missing")
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise _damaged(where, f"{name} is not base64") from None
    if length is not None and len(data) != length:
        raise _damaged(where, f"{name} is {len(data)} bytes, not {length}")
    return data


def _field_int(record: dict, name: str, where: str, low: int, high: int) -> int:
    value = record.get(name)
    if type(value) is not int or not low <= value <= high:
        raise _damaged(where, f"kdf {name} {value!r} is not in {low}..{high}")
    return value


def _read_key_file(path: str) -> bytes:
    """The master key in the key file ``path``."""
    try:
        with open(path, "rb") as f:
            raw = f.read(KEY_FILE_MAX_BYTES + 1)
    except OSError as exc:
        raise from_oserror(exc, f"key file {path}") from None
    bad = f"{path} is not a blksnap key file"
    if len(raw) > KEY_FILE_MAX_BYTES:
        raise InvalidArgument(f"{bad} (too large): pass the key file written for the repository")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(
            f"{bad} (not JSON): pass the key file written for the repository"
        ) from None
    if not isinstance(body, dict) or body.get("format") != KEY_FILE_FORMAT:
        raise InvalidArgument(f"{bad}: pass the key file written for the repository")
    if body.get("version") != KEY_FILE_VERSION:
        raise BlksnapError(
            f"key file {path} has version {body.get('version')!r}, this blksnap reads "
            f"version {KEY_FILE_VERSION}: use a newer blksnap",
            errno.EPROTONOSUPPORT,
        )
    key, key_id = body.get("key"), body.get("key_id")
    try:
        master = base64.b64decode(str(key).encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        master = b""
    if len(master) != MASTER_KEY_BYTES or key_id != _key_id_of(master):
        raise InvalidArgument(f"key file {path} is damaged (its key does not match its key id)")
    return master


def _keys_from_file(path: str, key_id: str, where: str) -> Keys:
    keys = Keys.from_master(_read_key_file(path))
    if keys.key_id != key_id:
        raise BlksnapError(
            f"key file {path} belongs to another repository "
            f"(key id {keys.key_id}, {where} needs {key_id})",
            errno.EKEYREJECTED,
        )
    return keys


def _unwrap(meta: dict, passphrase: bytes, where: str) -> bytes:
    kdf = meta.get("kdf")
    if not isinstance(kdf, dict):
        raise _damaged(where, "kdf missing")
    if kdf.get("name") != KDF:
        raise BlksnapError(
            f"{where} uses key derivation {kdf.get('name')!r}, this blksnap knows {KDF}: "
            "use a newer blksnap",
            errno.EPROTONOSUPPORT,
        )
    salt = _field_b64(kdf, "salt", where)
    if not 8 <= len(salt) <= 64:
        raise _damaged(where, f"salt is {len(salt)} bytes")
    iterations = _field_int(kdf, "iterations", where, 1, ARGON2_MAX_ITERATIONS)
    lanes = _field_int(kdf, "lanes", where, 1, ARGON2_MAX_LANES)
    memory_kib = _field_int(kdf, "memory_kib", where, 8 * lanes, ARGON2_MAX_MEMORY_KIB)
    nonce = _field_b64(meta, "nonce", where, NONCE_BYTES)
    wrapped = _field_b64(meta, "wrapped", where, MASTER_KEY_BYTES + TAG_BYTES)
    kek = _argon2(passphrase, salt, iterations, lanes, memory_kib)
    try:
        return AESGCM(kek).decrypt(nonce, wrapped, WRAP_AAD)
    except InvalidTag:
        raise BlksnapError(
            f"the passphrase does not open {where}'s key: check {PASSPHRASE_ENV}, "
            "or pass --key-file FILE with a key file of this repository",
            errno.EKEYREJECTED,
        ) from None


def open_keys(
    meta: dict | None,
    *,
    passphrase: bytes | None = None,
    key_file: str | None = None,
    where: str = "repository",
) -> Keys:
    """The keys of a repository whose ``REPO.json`` ``"encryption"`` record is
    ``meta`` (None: not encrypted), opened by the key file or the passphrase
    given. ``where`` names the repository in messages."""
    if meta is None:
        return Keys.plain()
    if not isinstance(meta, dict):
        raise _damaged(where, "not an object")
    cipher, digest, mode = meta.get("cipher"), meta.get("digest"), meta.get("mode")
    if cipher != CIPHER or digest != DIGEST or mode not in (MODE_PASSPHRASE, MODE_KEYFILE):
        raise BlksnapError(
            f"{where} is encrypted with cipher {cipher!r}, digest {digest!r}, key mode "
            f"{mode!r}; this blksnap knows {CIPHER}, {DIGEST}, "
            f"{MODE_PASSPHRASE}/{MODE_KEYFILE}: use a newer blksnap",
            errno.EPROTONOSUPPORT,
        )
    key_id = meta.get("key_id")
    if not isinstance(key_id, str) or not _KEY_ID_RE.fullmatch(key_id):
        raise _damaged(where, "key_id missing or malformed")

    if mode == MODE_KEYFILE:
        if key_file is None:
            raise BlksnapError(
                f"{where} is encrypted and its key is in a key file: pass --key-file FILE "
                f"({PASSPHRASE_ENV} cannot open it)",
                errno.ENOKEY,
            )
        return _keys_from_file(key_file, key_id, where)

    if key_file is not None:
        return _keys_from_file(key_file, key_id, where)
    if passphrase is None:
        raise BlksnapError(
            f"{where} is encrypted: set {PASSPHRASE_ENV} to its passphrase, "
            "or pass --key-file FILE with a key file exported from it",
            errno.ENOKEY,
        )
    master = _unwrap(meta, passphrase, where)
    keys = Keys.from_master(master)
    if keys.key_id != key_id:
        raise BlksnapError(
            f"the key unwrapped from {where}'s record has key id {keys.key_id}, "
            f"the record says {key_id}: REPO.json was altered; restore it from a copy",
            errno.EKEYREJECTED,
        )
    return keys

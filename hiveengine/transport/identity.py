"""Peer identity: an Ed25519 key pair whose public key hashes to the peer id."""

from __future__ import annotations

import base64
import functools
import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hiveengine.errors import ConfigurationError

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
PEER_ID_BYTES = 32


@dataclass(frozen=True, order=True)
class PeerID:
    """The SHA-256 of a peer's Ed25519 public key; printed as lowercase base32 without padding."""

    raw: bytes

    def __post_init__(self):
        if len(self.raw) != PEER_ID_BYTES:
            raise ValueError(f"a peer id has {PEER_ID_BYTES} bytes, got {len(self.raw)}")

    @classmethod
    def from_public_key(cls, public_key: bytes) -> PeerID:
        return cls(hashlib.sha256(public_key).digest())

    @classmethod
    def from_string(cls, text: str) -> PeerID:
        try:
            return cls(_unbase32(text))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{text!r} is not a peer id (expected {PEER_ID_BYTES} bytes in base32)") from e

    def __str__(self) -> str:
        return _base32(self.raw)

    def __repr__(self) -> str:
        return f"PeerID({str(self)[:12]}…)"


@functools.lru_cache(maxsize=4096)
def _unbase32(text: str) -> bytes:
    """A printed peer id's bytes, decoded once per text: addresses are parsed several times per round."""
    return base64.b32decode(text.upper() + "=" * (-len(text) % 8))


@functools.lru_cache(maxsize=4096)
def _base32(raw: bytes) -> str:
    """A peer id's printed form, computed once per id: it is printed on the hot path (about twice per RPC)."""
    return base64.b32encode(raw).decode().lower().rstrip("=")


VERIFIED_CACHE_SIZE = 4096  # signatures remembered as checked (a DHT record is checked by its node and its readers)
_verified: OrderedDict[tuple[bytes, bytes, bytes], None] = OrderedDict()


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True when `signature` is `public_key`'s Ed25519 signature of `message`; never raises on bad input. A good
    signature is remembered (by the message's SHA-256), so checking the same record again costs a hash, not ~0.15 ms."""
    try:
        seen = (bytes(public_key), bytes(signature), hashlib.sha256(message).digest())
    except TypeError:
        return False
    try:
        _verified.move_to_end(seen)  # one step: another thread may evict between a membership test and a move
        return True
    except KeyError:
        pass
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    _remember_verified(seen)
    return True


def _remember_verified(seen: tuple[bytes, bytes, bytes]) -> None:
    _verified[seen] = None
    if len(_verified) > VERIFIED_CACHE_SIZE:
        _verified.popitem(last=False)


class Identity:
    """An Ed25519 private key and the peer id it proves."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        self.public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id = PeerID.from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> Identity:
        """Load the key at `path` (raw 32-byte seed), creating it with mode 0600 if it does not exist."""
        path = Path(path)
        if path.exists():
            seed = path.read_bytes()
            if len(seed) != 32:
                raise ConfigurationError(f"{path} is not an identity key (expected 32 bytes, got {len(seed)})")
            return cls(Ed25519PrivateKey.from_private_bytes(seed))
        identity = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(identity.private_bytes())
        return identity

    def private_bytes(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def sign(self, message: bytes) -> bytes:
        """Our signature of `message`, remembered as good: checking our own record (its DHT node stores it as it
        stores anyone's) then costs a hash, not ~0.15 ms on a round's critical path."""
        signature = self._key.sign(message)
        _remember_verified((self.public_key, signature, hashlib.sha256(message).digest()))
        return signature

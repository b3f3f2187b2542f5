"""Record validation: owner-signed records and a hook for schema checks.

Convention for signed records: a key or subkey that contains the text `[owner:<public key>]` (the owner's
32-byte Ed25519 public key in lowercase base32 without padding, as `DHT.owner_marker` prints it) may only be
written by that owner. The marker is found in the key's serialized (msgpack) form, so it may sit anywhere
inside a string or bytes key, or inside a tuple key. The owner signs
msgpack([SIGNATURE_DOMAIN, key, subkey, value, expiration_time]) and the signature travels with the record.
Because the expiration time is signed, a replayed old write carries its old expiration and loses under
newer-wins; because the key and subkey are signed, a signature cannot be moved to another record. A record
that names two different owners can never be valid. Every node checks this before it stores a record, and
a reader checks it again on everything it is sent.
"""

from __future__ import annotations

import base64
import functools
import logging
import re
from collections.abc import Iterable

import msgpack

from hiveengine.dht.storage import Record
from hiveengine.transport import Identity, PeerID
from hiveengine.transport.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, verify_signature

logger = logging.getLogger(__name__)

SIGNATURE_DOMAIN = b"hiveengine-dht-record-v1"
OWNER_PATTERN = re.compile(rb"\[owner:([a-z2-7]{52})\]")


@functools.lru_cache(maxsize=1024)
def owner_marker(public_key: bytes) -> str:
    """The text that, put in a key or subkey, reserves it for the holder of `public_key`."""
    return f"[owner:{base64.b32encode(public_key).decode().lower().rstrip('=')}]"


def named_owners(record: Record) -> set[bytes]:
    """The public keys named by `[owner:...]` markers in the record's key and subkey."""
    return set(_owners_in(record.key) | _owners_in(record.subkey or b""))


def named_owners_of(field: object) -> set[bytes]:
    """The public keys named by `[owner:...]` markers in a key or subkey as the DHT returns it (str or bytes)."""
    return set(_owners_in(field.encode() if isinstance(field, str) else field if isinstance(field, bytes) else b""))


def _owners_in(field: bytes) -> frozenset[bytes]:
    return _owners_in_cached(bytes(field))


@functools.lru_cache(maxsize=4096)
def _owners_in_cached(field: bytes) -> frozenset[bytes]:
    """The owners a key or subkey names, found once per distinct field (records are checked on every hop)."""
    owners = set()
    for match in OWNER_PATTERN.finditer(field):
        raw = base64.b32decode(match.group(1).upper() + b"====")
        if len(raw) == PUBLIC_KEY_BYTES:
            owners.add(raw)
    return frozenset(owners)


def signer_of(subkey: object) -> PeerID | None:
    """The peer a subkey (as DHT reads return it) speaks for: the one whose owner marker it is, exactly."""
    owners = named_owners_of(subkey) if isinstance(subkey, str) else set()
    if len(owners) != 1:
        return None
    public_key = next(iter(owners))
    return PeerID.from_public_key(public_key) if subkey == owner_marker(public_key) else None


def signed_message(record: Record) -> bytes:
    """The bytes an owner signs: everything that identifies the record and what it says."""
    return msgpack.packb(
        [SIGNATURE_DOMAIN, record.key, record.subkey, record.value, record.expiration_time], use_bin_type=True
    )


class RecordValidator:
    """A check that every record must pass before a node stores it or a reader accepts it. Subclass it for
    schema checks (override `validate`); `sign` lets a validator add what its own writes need."""

    def validate(self, record: Record) -> bool:
        """True if the record may be stored and returned."""
        return True

    def sign(self, record: Record) -> Record:
        """The record as this node should send it (e.g. with a signature added)."""
        return record


class OwnerSignatureValidator(RecordValidator):
    """Records naming an owner must carry that owner's signature; signs the records this node owns."""

    def __init__(self, identity: Identity):
        self.identity = identity

    def validate(self, record: Record) -> bool:
        """Whether the record may be stored: records naming no owner are, unsigned (a signature there would
        vouch for nothing, yet storage ranks signed records first); a record naming one owner needs that owner's
        valid signature."""
        owners = named_owners(record)
        if not owners:
            return record.signature is None
        if len(owners) > 1 or record.signature is None or len(record.signature) != SIGNATURE_BYTES:
            return False
        return verify_signature(next(iter(owners)), record.signature, signed_message(record))

    def sign(self, record: Record) -> Record:
        """The record signed by this node if it names this node as its owner; otherwise unchanged."""
        if named_owners(record) != {self.identity.public_key}:
            return record
        signature = self.identity.sign(signed_message(record))
        return Record(record.key, record.subkey, record.value, record.expiration_time, signature)


class CompositeValidator(RecordValidator):
    """All of several validators: valid only if each agrees; signs with each in turn."""

    def __init__(self, validators: Iterable[RecordValidator]):
        self.validators = list(validators)

    def validate(self, record: Record) -> bool:
        for validator in self.validators:
            try:
                if not validator.validate(record):
                    return False
            except Exception:
                logger.warning("validator %r failed on a record; treating it as invalid", validator, exc_info=True)
                return False
        return True

    def sign(self, record: Record) -> Record:
        for validator in self.validators:
            record = validator.sign(record)
        return record

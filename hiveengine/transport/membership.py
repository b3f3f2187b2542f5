"""Private swarms: the run owner's key signs membership certificates, and every handshake checks them.

Construction (Ed25519 from `cryptography`, nothing else):

- The swarm key is an Ed25519 key pair that the run owner keeps offline; the swarm id is its public key.
- A certificate is CERTIFICATE = issuer key (32) | subject key (32) | expires (u64, Unix seconds) | roles (u32) |
  signature (64), where signature = Ed25519(issuer, CERT_DOMAIN | swarm key | issuer | subject | expires | roles).
- A peer proves membership with a chain of 1..MAX_CHAIN certificates: the first is issued by the swarm key, each
  next one by the previous one's subject, and the last one names the peer's own identity key. A chain of two lets a
  member (invited once by the owner) certify its own worker processes, without asking the owner for each one.
  Every certificate of the chain must be live; a delegated certificate can only narrow the roles (permissions are
  ANDed along the chain, restrictions ORed).
- The chain travels in the handshake's HELLO (handshake.py), inside the transcript that both identities sign, so it
  is bound to the session; a peer that presents none, or a chain that does not check, is refused before any of its
  messages (DHT records, averaging traffic, expert calls) is read.

The whole process is in one swarm (its peers share one listener): `use(credentials)` sets it, `current()` reads
it; None is an open swarm, where anyone who can reach an address may connect. A certificate is checked when a
connection opens: a connection made before it expired lives on until it closes.
"""

from __future__ import annotations

import base64
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hiveengine.errors import ConfigurationError, MembershipError
from hiveengine.transport.identity import SIGNATURE_BYTES, Identity, PeerID, verify_signature

logger = logging.getLogger(__name__)

CERT_DOMAIN = b"hiveengine-membership-v1"
CERTIFICATE = struct.Struct("<32s32sQI64s")
MAX_CHAIN = 2  # owner -> member -> the member's worker process
OPEN = bytes(32)  # the swarm field of a peer in an open swarm
ROLE_CLIENT_ONLY = 1  # a restriction: the peer may only call others (no serving, no reducing)
ROLE_HOST_EXPERTS = 2  # a permission: the peer may declare and serve experts
RESTRICTIONS = ROLE_CLIENT_ONLY
ROLE_NAMES = {"client-only": ROLE_CLIENT_ONLY, "host-experts": ROLE_HOST_EXPERTS}
DEFAULT_INVITE_DAYS = 30.0
SWARM_KEY_HEADER = "hiveengine-swarm-key-v1"
MEMBERSHIP_HEADER = "hiveengine-membership-v1"
OPEN_SWARM = "open"  # the explicit value of an open swarm where a swarm file is expected


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key of an Ed25519 private key."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _seed(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def key_text(public_key: bytes) -> str:
    """A public key as users copy it: lowercase base32 without padding (as peer ids are printed)."""
    return base64.b32encode(public_key).decode().lower().rstrip("=")


def parse_key_text(text: str) -> bytes:
    """The 32-byte public key printed by `key_text`; ConfigurationError if it is not one."""
    try:
        raw = base64.b32decode(text.strip().upper() + "=" * (-len(text.strip()) % 8))
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigurationError(
            f"{text!r} is not a public key (32 bytes in base32, as `hiveengine swarm keygen` prints)"
        )
    return raw


@dataclass(frozen=True)
class Certificate:
    """`issuer` vouches that `subject` is a member of the swarm until `expires`, with `roles`."""

    issuer: bytes
    subject: bytes
    expires: int
    roles: int
    signature: bytes

    @staticmethod
    def signed_bytes(swarm: bytes, issuer: bytes, subject: bytes, expires: int, roles: int) -> bytes:
        return CERT_DOMAIN + swarm + issuer + subject + struct.pack("<QI", expires, roles)

    @classmethod
    def issue(
        cls, swarm: bytes, issuer: Ed25519PrivateKey, subject: bytes, expires: float, roles: int = 0
    ) -> Certificate:
        """Sign a certificate for the public key `subject` with `issuer`'s key."""
        issuer_public, expires = public_bytes(issuer), int(expires)
        signature = issuer.sign(cls.signed_bytes(swarm, issuer_public, subject, expires, roles))
        return cls(issuer_public, subject, expires, roles, signature)

    def pack(self) -> bytes:
        return CERTIFICATE.pack(self.issuer, self.subject, self.expires, self.roles, self.signature)

    @classmethod
    def unpack(cls, data: bytes) -> Certificate:
        return cls(*CERTIFICATE.unpack(data))


def pack_chain(chain: tuple[Certificate, ...]) -> bytes:
    """The chain as it travels in a HELLO."""
    return b"".join(c.pack() for c in chain)


def unpack_chain(data: bytes) -> tuple[Certificate, ...]:
    """Parse `pack_chain`'s bytes; MembershipError if they are not whole certificates."""
    if len(data) % CERTIFICATE.size or len(data) > MAX_CHAIN * CERTIFICATE.size:
        raise MembershipError(f"a membership chain has 1 to {MAX_CHAIN} certificates of {CERTIFICATE.size} bytes")
    return tuple(Certificate.unpack(data[i : i + CERTIFICATE.size]) for i in range(0, len(data), CERTIFICATE.size))


def expiry_text(seconds: int) -> str:
    """An expiry time as people read it."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def verify_chain(swarm: bytes, public_key: bytes, chain: tuple[Certificate, ...], now: float | None = None) -> int:
    """The roles `chain` grants `public_key` in `swarm`; MembershipError saying what is wrong otherwise."""
    now = time.time() if now is None else now
    who = PeerID.from_public_key(public_key)
    if not chain:
        raise MembershipError(f"peer {who} presented no membership certificate for private swarm {key_text(swarm)}")
    if len(chain) > MAX_CHAIN:
        raise MembershipError(f"peer {who} presented {len(chain)} certificates; at most MAX_CHAIN = {MAX_CHAIN}")
    issuer, permissions, restrictions = swarm, ~0, 0
    for cert in chain:
        if cert.issuer != issuer:
            raise MembershipError(f"peer {who}'s membership chain is not issued by swarm {key_text(swarm)}")
        message = Certificate.signed_bytes(swarm, cert.issuer, cert.subject, cert.expires, cert.roles)
        if len(cert.signature) != SIGNATURE_BYTES or not verify_signature(cert.issuer, cert.signature, message):
            raise MembershipError(f"peer {who}'s membership certificate has an invalid signature (forged or altered)")
        if cert.expires <= now:
            raise MembershipError(
                f"peer {who}'s membership certificate expired at {expiry_text(cert.expires)}; the swarm owner can "
                "issue a new one with `hiveengine swarm invite`"
            )
        issuer, permissions, restrictions = cert.subject, permissions & cert.roles, restrictions | cert.roles
    if issuer != public_key:
        raise MembershipError(f"peer {who} presented a membership certificate issued to another key")
    return (permissions & ~RESTRICTIONS) | (restrictions & RESTRICTIONS)


@dataclass(frozen=True)
class SwarmCredentials:
    """What a process needs to be a member: the swarm key, the chain that certifies `key`, and `key` itself, which
    certifies the process's own peers (the owner's credentials: the swarm key itself and an empty chain)."""

    swarm: bytes
    chain: tuple[Certificate, ...]
    key: Ed25519PrivateKey

    @property
    def expires(self) -> int | None:
        return min((c.expires for c in self.chain), default=None)

    @property
    def roles(self) -> int:
        """What our chain grants us (the owner: every permission, no restriction); unchecked: others check it."""
        permissions, restrictions = ~0, 0
        for cert in self.chain:
            permissions, restrictions = permissions & cert.roles, restrictions | cert.roles
        return (permissions & ~RESTRICTIONS & ROLE_HOST_EXPERTS) | (restrictions & RESTRICTIONS)

    def chain_for(self, identity: Identity) -> tuple[Certificate, ...]:
        """The chain that proves `identity` a member: ours, extended by a certificate our key signs for it."""
        if self.chain and identity.public_key == public_bytes(self.key):
            return self.chain
        return self.chain_for_key(identity.public_key, time.time() + DEFAULT_INVITE_DAYS * 86400, self.roles)

    def chain_for_key(self, subject: bytes, expires: float, roles: int) -> tuple[Certificate, ...]:
        """Our chain extended by a certificate for the public key `subject` (expiring no later than ours)."""
        if len(self.chain) >= MAX_CHAIN:
            raise MembershipError(f"this membership cannot certify other keys (chains have at most {MAX_CHAIN})")
        if self.expires is not None:
            expires = min(expires, self.expires)
        return (*self.chain, Certificate.issue(self.swarm, self.key, subject, expires, roles))


class _Cache:
    """Chains already made for this process's identities (one signature per identity, not per handshake)."""

    def __init__(self):
        self.credentials: SwarmCredentials | None = None
        self.chains: dict[bytes, tuple[Certificate, ...]] = {}


_process = _Cache()


def use(credentials: SwarmCredentials | None) -> None:
    """Put this whole process into the swarm `credentials` prove membership of (None: an open swarm)."""
    _process.credentials, _process.chains = credentials, {}
    if credentials is None:
        logger.info("open swarm: any peer that can reach this process's address may connect")
    else:
        logger.info("private swarm %s: only members are admitted", key_text(credentials.swarm)[:16])


def current() -> SwarmCredentials | None:
    """The swarm this process belongs to (None: open)."""
    return _process.credentials


def swarm_id() -> bytes:
    """The 32-byte swarm key this process requires of others (OPEN when the swarm is open)."""
    return OPEN if _process.credentials is None else _process.credentials.swarm


def chain_for(identity: Identity) -> tuple[Certificate, ...]:
    """The chain `identity` presents at handshakes (empty in an open swarm)."""
    credentials = _process.credentials
    if credentials is None:
        return ()
    chain = _process.chains.get(identity.public_key)
    if chain is None or min(c.expires for c in chain) <= time.time():
        chain = _process.chains[identity.public_key] = credentials.chain_for(identity)
    return chain


def refusal_reason(identity: Identity) -> str:
    """Why a peer of our swarm may have refused `identity`'s chain, as far as this process can tell."""
    credentials = _process.credentials
    if credentials is None:
        return "this process is in an open swarm"
    try:
        verify_chain(credentials.swarm, identity.public_key, chain_for(identity))
    except MembershipError as e:
        return str(e)
    return "our certificate checks here: the peer may be in another swarm, or its clock is off"


def client_only() -> bool:
    """Whether this process's certificate restricts it to calling others (ROLE_CLIENT_ONLY): nobody dials it, so
    its DHT nodes and averagers run in client mode."""
    credentials = current()
    return credentials is not None and bool(credentials.roles & ROLE_CLIENT_ONLY)


def may_host_experts(roles: int | None = None) -> bool:
    """Whether a peer whose certificate grants `roles` (None: this process) may serve experts: anyone in an open
    swarm, in a private one only a member with ROLE_HOST_EXPERTS."""
    credentials = current()
    if credentials is None:
        return True
    return bool((credentials.roles if roles is None else roles) & ROLE_HOST_EXPERTS)


def admit(swarm: bytes, public_key: bytes, chain: tuple[Certificate, ...]) -> int:
    """Check a remote peer against this process's swarm: its roles, or MembershipError with what to do."""
    ours = swarm_id()
    who = PeerID.from_public_key(public_key)
    if swarm != ours:
        if ours == OPEN:
            raise MembershipError(
                f"peer {who} belongs to private swarm {key_text(swarm)}, and this process to an open swarm: "
                "join with the membership file its owner gave you (--swarm FILE or HIVEENGINE_SWARM)"
            )
        theirs = "an open swarm" if swarm == OPEN else f"private swarm {key_text(swarm)}"
        raise MembershipError(f"peer {who} belongs to {theirs}, not to this process's swarm {key_text(ours)}")
    return 0 if swarm == OPEN else verify_chain(swarm, public_key, chain)


# ---- files


def generate_swarm_key() -> Ed25519PrivateKey:
    """A new swarm (or member) key."""
    return Ed25519PrivateKey.generate()


def swarm_key_file(key: Ed25519PrivateKey) -> bytes:
    """The text of a swarm key file (keep it secret: it admits anyone)."""
    seed = base64.b64encode(_seed(key)).decode()
    return f"{SWARM_KEY_HEADER}\nswarm {key_text(public_bytes(key))}\nkey {seed}\n".encode()


def membership_file(swarm: bytes, chain: tuple[Certificate, ...], key: Ed25519PrivateKey | None = None) -> bytes:
    """The text of a membership file: the swarm, the chain and, to certify the holder's own processes, its key."""
    lines = [MEMBERSHIP_HEADER, f"swarm {key_text(swarm)}"]
    lines += [f"cert {base64.b64encode(c.pack()).decode()}" for c in chain]
    if key is not None:
        lines.append(f"key {base64.b64encode(_seed(key)).decode()}")
    return ("\n".join(lines) + "\n").encode()


def write_secret(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a new file readable only by its owner (mode 0600); refuse to overwrite one."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigurationError(f"{path} exists already; choose another name or remove it first") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _fields(path: Path) -> tuple[str, dict[str, list[str]]]:
    try:
        lines = path.read_text().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigurationError(f"cannot read swarm file {path}: {e}") from None
    fields: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.strip().partition(" ")
        if name:
            fields.setdefault(name, []).append(value.strip())
    return lines[0].strip(), fields


def _private_key(text: str, path: Path) -> Ed25519PrivateKey:
    try:
        seed = base64.b64decode(text, validate=True)
        return Ed25519PrivateKey.from_private_bytes(seed)
    except ValueError:
        raise ConfigurationError(f"{path}: the key line is not a base64 Ed25519 key") from None


def load(path: str | os.PathLike) -> SwarmCredentials | None:
    """Read a swarm key file or a membership file (None for the word `open`); ConfigurationError with what to do
    when it is neither, or when a membership file cannot certify this process's peers."""
    if str(path) == OPEN_SWARM:
        return None
    path = Path(path)
    header, fields = _fields(path)
    if header == SWARM_KEY_HEADER and len(fields.get("key", ())) == 1:
        key = _private_key(fields["key"][0], path)
        return SwarmCredentials(public_bytes(key), (), key)
    if header != MEMBERSHIP_HEADER or len(fields.get("swarm", ())) != 1:
        raise ConfigurationError(
            f"{path} is neither a swarm key nor a membership file (make one with `hiveengine swarm keygen` or "
            "`hiveengine swarm invite`)"
        )
    swarm = parse_key_text(fields["swarm"][0])
    try:
        chain = tuple(Certificate.unpack(base64.b64decode(c, validate=True)) for c in fields.get("cert", ()))
    except (ValueError, struct.error):
        raise ConfigurationError(f"{path}: a cert line is not a certificate") from None
    if len(fields.get("key", ())) != 1:
        raise ConfigurationError(
            f"{path} holds no key for its certificate: combine it with the key it was issued for: "
            f"`hiveengine swarm join {path} KEYFILE -o FILE`"
        )
    key = _private_key(fields["key"][0], path)
    try:
        verify_chain(swarm, public_bytes(key), chain)
    except MembershipError as e:
        raise ConfigurationError(f"{path}: {e}") from None
    return SwarmCredentials(swarm, chain, key)


def certificate_chain(path: str | os.PathLike) -> tuple[bytes, tuple[Certificate, ...]]:
    """The swarm and chain of a membership file that may lack its key (as `hiveengine swarm invite PUBKEY` writes)."""
    path = Path(path)
    header, fields = _fields(path)
    if header != MEMBERSHIP_HEADER or len(fields.get("swarm", ())) != 1:
        raise ConfigurationError(f"{path} is not a membership file (`hiveengine swarm invite` writes them)")
    try:
        chain = tuple(Certificate.unpack(base64.b64decode(c, validate=True)) for c in fields.get("cert", ()))
    except (ValueError, struct.error):
        raise ConfigurationError(f"{path}: a cert line is not a certificate") from None
    return parse_key_text(fields["swarm"][0]), chain


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """An identity key file (32 raw bytes, as peers keep theirs) or a swarm key file."""
    path = Path(path)
    data = path.read_bytes() if path.is_file() else b""
    if len(data) == 32:
        return Ed25519PrivateKey.from_private_bytes(data)
    fields = _fields(path)[1] if data else {}
    if len(fields.get("key", ())) == 1:
        return _private_key(fields["key"][0], path)
    raise ConfigurationError(f"{path} is not a key file (an identity key or one `hiveengine swarm keygen` wrote)")

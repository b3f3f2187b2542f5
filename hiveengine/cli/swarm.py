"""`hiveengine swarm`: make a private swarm's keys and membership files, offline (no server involved).

The owner runs `keygen` once and `invite` per member; a member passes the file it got to `hiveengine launch --swarm`
(or HIVEENGINE_SWARM). A member who keeps its own key sends `pubkey`'s output to the owner, gets a certificate from
`invite PUBKEY` and combines the two with `join`. See hiveengine/transport/membership.py for the construction.
"""

from __future__ import annotations

import argparse
import time

from hiveengine.cli.common import UsageError
from hiveengine.errors import ConfigurationError, MembershipError
from hiveengine.transport import Identity, membership

SWARM_PREFIX = "swarm"  # keygen's output line: "swarm PUBKEY"
PUBKEY_PREFIX = "pubkey"


def add_commands(sub) -> None:
    swarm = sub.add_parser("swarm", help="private swarms: make the swarm key and members' certificates (offline)")
    commands = swarm.add_subparsers(dest="swarm_command", required=True, metavar="SWARM_COMMAND")

    keygen = commands.add_parser("keygen", help="make a new swarm key (keep it secret: it admits anyone)")
    keygen.add_argument("-o", "--out", required=True, metavar="FILE", help="where to write the key (mode 0600)")
    keygen.set_defaults(handler=cmd_keygen)

    invite = commands.add_parser("invite", help="write a membership file for a member")
    invite.add_argument(
        "pubkey",
        nargs="?",
        metavar="PUBKEY",
        help="the member's public key (`hiveengine swarm pubkey` prints it); none: make a new key for the member "
        "and put it in the file, which is then a secret to hand over privately",
    )
    invite.add_argument("--swarm-key", required=True, metavar="FILE", help="the swarm key from `keygen`")
    invite.add_argument("-o", "--out", required=True, metavar="FILE", help="where to write the membership file")
    invite.add_argument(
        "--days", type=float, default=membership.DEFAULT_INVITE_DAYS, help="days until the membership expires"
    )
    invite.add_argument(
        "--role",
        action="append",
        choices=sorted(membership.ROLE_NAMES),
        help="client-only: may only call others; host-experts: may serve experts (default: host-experts)",
    )
    invite.set_defaults(handler=cmd_invite)

    pubkey = commands.add_parser("pubkey", help="print the public key of a key file (made if missing)")
    pubkey.add_argument("keyfile", metavar="KEYFILE", help="a peer's identity key, e.g. --identity-dir's files")
    pubkey.set_defaults(handler=cmd_pubkey)

    join = commands.add_parser("join", help="combine a certificate from `invite PUBKEY` with its key")
    join.add_argument("certificate", metavar="CERT", help="the membership file the owner sent")
    join.add_argument("keyfile", metavar="KEYFILE", help="the key whose public key the owner certified")
    join.add_argument("-o", "--out", required=True, metavar="FILE", help="the membership file to launch with")
    join.set_defaults(handler=cmd_join)


def cmd_keygen(args: argparse.Namespace) -> int:
    key = membership.generate_swarm_key()
    membership.write_secret(args.out, membership.swarm_key_file(key))
    print(f"{SWARM_PREFIX} {membership.key_text(membership.public_bytes(key))}")
    return 0


def cmd_invite(args: argparse.Namespace) -> int:
    owner = membership.load(args.swarm_key)
    if owner is None:
        raise UsageError("--swarm-key: an open swarm has no key; make one with `hiveengine swarm keygen`")
    if not args.days > 0:
        raise UsageError(f"--days must be > 0, got {args.days:g}")
    roles = 0
    for name in args.role or ["host-experts"]:
        roles |= membership.ROLE_NAMES[name]
    key = None if args.pubkey else membership.generate_swarm_key()
    subject = membership.parse_key_text(args.pubkey) if args.pubkey else membership.public_bytes(key)
    chain = owner.chain_for_key(subject, time.time() + args.days * 86400, roles)
    membership.write_secret(args.out, membership.membership_file(owner.swarm, chain, key))
    until = membership.expiry_text(min(c.expires for c in chain))
    print(f"member {membership.key_text(subject)} of {SWARM_PREFIX} {membership.key_text(owner.swarm)} until {until}")
    return 0


def cmd_pubkey(args: argparse.Namespace) -> int:
    print(f"{PUBKEY_PREFIX} {membership.key_text(Identity.load_or_create(args.keyfile).public_key)}")
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    swarm, chain = membership.certificate_chain(args.certificate)
    key = membership.load_private_key(args.keyfile)
    try:
        membership.verify_chain(swarm, membership.public_bytes(key), chain)
    except MembershipError as e:
        raise ConfigurationError(f"{args.certificate} does not admit {args.keyfile}: {e}") from None
    membership.write_secret(args.out, membership.membership_file(swarm, chain, key))
    print(f"member {membership.key_text(membership.public_bytes(key))} of {SWARM_PREFIX} {membership.key_text(swarm)}")
    return 0

"""What the subcommands share: usage errors, peer address options, log levels."""

from __future__ import annotations

import argparse
import logging
import re

from hiveengine.transport.address import PeerAddress

USAGE_EXIT_CODE = 2  # as argparse exits on a malformed command line
ADDRESS_SEPARATORS = re.compile(r"[,\s]+")


class UsageError(Exception):
    """A mistake in the command line or its environment; the CLI prints the message alone and exits 2."""


def split_addresses(values: str | list[str] | None) -> list[str]:
    """Addresses from option values and environment variables: each may hold several, separated by commas
    or whitespace."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [a for value in values for a in ADDRESS_SEPARATORS.split(value) if a]


def check_addresses(addresses: list[str], option: str = "--initial-peers") -> list[str]:
    """`addresses` unchanged if each is a peer address; else a UsageError naming the bad one."""
    for address in addresses:
        try:
            PeerAddress.parse(address)
        except ValueError as e:
            problem = str(e) if repr(address) in str(e) else f"{address!r}: {e}"
            raise UsageError(f"{option}: {problem}") from None
    return addresses


def add_initial_peers(parser: argparse.ArgumentParser, help: str, env: str | None = None) -> None:
    """--initial-peers ADDR, repeatable, each value possibly a comma-separated list (never swallows a
    positional argument, unlike nargs='*')."""
    parser.add_argument(
        "--initial-peers",
        action="append",
        default=None,
        metavar="ADDR[,ADDR...]",
        help=help + " (repeat the option or separate addresses with commas" + (f"; env {env})" if env else ")"),
    )


def initial_peers(args: argparse.Namespace, environ_value: str | None = None) -> list[str]:
    """The checked --initial-peers addresses, or those in `environ_value` when the option was not given."""
    given = args.initial_peers if args.initial_peers is not None else environ_value
    return check_addresses(split_addresses(given))


def log_level(text: str) -> str:
    """argparse type of --log-level: a logging level name (any case) or number."""
    name = text.strip().upper()
    if name.isdigit() or isinstance(logging.getLevelName(name), int):
        return name
    choices = ", ".join(n for n in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    raise argparse.ArgumentTypeError(f"unknown log level {text!r} (choose from {choices})")

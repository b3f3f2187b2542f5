"""The `hiveengine` command line: one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys

from hiveengine.cli import bench, dht, launch, peer, serve, status

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hiveengine", description="Decentralized deep learning over the Internet.")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    launch.add_commands(sub)
    status.add_commands(sub)
    serve.add_commands(sub)
    peer.add_commands(sub)
    dht.add_commands(sub)
    bench.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

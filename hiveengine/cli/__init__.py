"""The `hiveengine` command line: one subcommand per job.

Mistakes in a command line print one line, `hiveengine COMMAND: error: ...`, and exit 2 (as argparse does);
other errors hiveengine raises on purpose print one line and exit 1 (`--log-level DEBUG` adds the traceback).
Ctrl-C exits 130 without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C
ERROR_EXIT_CODE = 1

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    import hiveengine
    from hiveengine.cli import bench, dht, doctor, launch, peer, serve, status, swarm
    from hiveengine.cli.common import log_level
    from hiveengine.engine.env import LOG_LEVEL_ENV

    parser = argparse.ArgumentParser(prog="hiveengine", description="Decentralized deep learning over the Internet.")
    parser.add_argument("--version", action="version", version=f"hiveengine {hiveengine.__version__}")
    parser.add_argument(
        "--log-level",
        type=log_level,
        default=None,
        help=f"logging level, e.g. INFO (default: WARNING; env {LOG_LEVEL_ENV}); `launch` passes it on to its workers",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    launch.add_commands(sub)
    status.add_commands(sub)
    serve.add_commands(sub)
    peer.add_commands(sub)
    dht.add_commands(sub)
    bench.add_commands(sub)
    doctor.add_commands(sub)
    swarm.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before a command installed its own handling, or after it ended
        return INTERRUPTED_EXIT_CODE


def _main(argv: list[str] | None) -> int:
    from hiveengine.cli.common import USAGE_EXIT_CODE, UsageError, log_level
    from hiveengine.engine.env import LOG_LEVEL_ENV
    from hiveengine.errors import ConfigurationError, HiveEngineError

    args = build_parser().parse_args(argv)
    if args.log_level is None and os.environ.get(LOG_LEVEL_ENV):
        try:
            args.log_level = log_level(os.environ[LOG_LEVEL_ENV])
        except argparse.ArgumentTypeError as e:
            return _fail(args.command, f"{LOG_LEVEL_ENV}: {e}", USAGE_EXIT_CODE)
    logging.basicConfig(level=args.log_level or "WARNING", format=LOG_FORMAT)
    try:
        return int(args.handler(args) or 0)
    except (UsageError, ConfigurationError) as e:
        logger.debug("usage error", exc_info=True)
        return _fail(args.command, str(e), USAGE_EXIT_CODE)
    except HiveEngineError as e:
        logger.debug("failed", exc_info=True)
        return _fail(args.command, f"{e}", ERROR_EXIT_CODE)


def _fail(command: str, message: str, code: int) -> int:
    print(f"hiveengine {command}: error: {message}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

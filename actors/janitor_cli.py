"""``kizo janitor [--once]``; ``kizo up`` runs it after the workers."""

from __future__ import annotations

import argparse

from infra.commands import Command
from infra.config import Config


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--once",
        action="store_true",
        help="run one pass, print its findings; exit 0 when there are none, 1 otherwise",
    )


def _janitor(config: Config, args: argparse.Namespace) -> int:
    from actors.janitor_main import main
    from infra import aio
    from infra.addresses import ensure_free

    if not args.once:  # a single pass serves no metrics
        ensure_free(config.host, config.pipeline.janitor_metrics_port, "KIZO_JANITOR_METRICS_PORT")

    return aio.run(main(config, once=bool(args.once)))


COMMANDS = [
    Command("janitor", _janitor, _configure),
]

"""``kizo janitor [--once]``; ``kizo up`` runs it after the workers."""

from __future__ import annotations

import argparse

from kizo.cli import Command, register
from kizo.config import Config
from kizo.supervisor import Child, register_child


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--once",
        action="store_true",
        help="run one pass, print its findings; exit 0 when there are none, 1 otherwise",
    )


def _janitor(config: Config, args: argparse.Namespace) -> int:
    from actors.janitor_main import main
    from kizo import aio

    return aio.run(main(config, once=bool(args.once)))


def _children(config: Config) -> list[Child]:
    url = f"http://{config.host}:{config.pipeline.janitor_metrics_port}/metrics"
    return [Child("janitor", ["janitor"], url, url)]


register(
    Command(
        "janitor", "re-drive stuck work, resolve the bank, audit, reconcile", _janitor, _configure
    )
)
register_child(_children)

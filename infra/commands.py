"""What a ``kizo`` subcommand is. Each component defines its commands beside the code they run
(a module-level ``COMMANDS`` list); ``kizo.cli`` names the module of each command in one table and
imports only the one that runs, so ``kizo api`` never loads the chaos harness or the benches.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from infra.config import Config

Handler = Callable[[Config, argparse.Namespace], int]


def _no_options(_parser: argparse.ArgumentParser) -> None:
    pass


@dataclass(frozen=True)
class Command:
    """``kizo <name>``: ``handler(config, args)`` returns the exit code; ``configure`` adds the
    command's options. Its one-line help lives in ``kizo.cli``'s table."""

    name: str
    handler: Handler
    configure: Callable[[argparse.ArgumentParser], None] = _no_options


class UsageError(Exception):
    """Bad input to a command: printed as one line, exit code 2."""


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer from ``low`` to ``high`` (argparse names the flag)."""

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return parse

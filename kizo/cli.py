"""``kizo``: the one command. Bad input is a one-line message and a non-zero exit, never a trace.

Each subcommand is a function ``(config, args) -> exit code`` registered in ``COMMANDS``; the
modules behind them are imported only when their command runs, so ``kizo migrate`` does not pay
for the web stack.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from kizo.config import Config, ConfigError

Handler = Callable[[Config, argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    handler: Handler
    configure: Callable[[argparse.ArgumentParser], None] = lambda _parser: None


class UsageError(Exception):
    """Bad input to a command: printed as one line, exit code 2."""


def _up(config: Config, args: argparse.Namespace) -> int:
    from kizo.supervisor import run_up

    return run_up(config, exit_after_ready=bool(args.exit_after_ready))


def _configure_up(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--exit-after-ready",
        action="store_true",
        help="start everything, print the ready line, then stop (a smoke test)",
    )


def _migrate(config: Config, _args: argparse.Namespace) -> int:
    from kizo import aio
    from kizo.servers import EmbeddedPostgres
    from kizo.supervisor import prepare_database

    pg = None
    if config.embedded_postgres:
        pg = EmbeddedPostgres(config.pg_data_dir, config.pg_port, fsync=config.pg_fsync)
        pg.start()
    try:
        url = pg.url() if pg is not None else config.pg_url()
        applied = aio.run(prepare_database(url, config.ledger.currency))
    finally:
        if pg is not None:
            pg.stop()
    print("applied: " + ", ".join(applied) if applied else "up to date")
    return 0


def _db_shell(config: Config, _args: argparse.Namespace) -> int:
    from kizo.servers import pg_bin_dir

    if config.embedded_postgres:
        from kizo.servers import port_open

        if not port_open(config.host, config.pg_port):
            raise UsageError("embedded PostgreSQL is not running; start it with `kizo up`")
    return subprocess.call([str(pg_bin_dir() / "psql"), config.pg_url()])


COMMANDS: list[Command] = [
    Command("up", "run the whole system until Ctrl-C", _up, _configure_up),
    Command("migrate", "apply pending database migrations", _migrate),
    Command("db-shell", "open psql on Kizo's database", _db_shell),
]


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


def register(command: Command) -> None:
    COMMANDS.append(command)


def load_plugins() -> None:
    """Commands that live with the code they run register themselves on import."""
    import importlib
    import importlib.util

    for module in PLUGIN_MODULES:
        # A component not built yet has no module; one that exists must import cleanly.
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


# Modules that call ``register`` (and ``kizo.supervisor.register_child``) at import, in the
# order ``kizo up`` starts their processes; kept light (no heavy imports at module level).
PLUGIN_MODULES: list[str] = [
    "kizo.bench_cli",
    "kizo.loadtest",
    "chaos.proxy.cli",
    "chaos.mockbank.cli",
    "actors.cli",
    "actors.janitor_cli",
    "api.cli",
    "chaos.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kizo", description="Kizo wallet settlement engine")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        command.configure(child)
        child.set_defaults(handler=command.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    load_plugins()
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        config = Config.from_env(os.environ)
        handler: Handler = args.handler
        return handler(config, args)
    except (ConfigError, UsageError) as exc:
        print(f"kizo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run through the canonical module: under ``python -m`` this file is ``__main__``, and the
    # plugins register their commands on ``kizo.cli``, not on this copy.
    from kizo.cli import main as canonical_main

    raise SystemExit(canonical_main())

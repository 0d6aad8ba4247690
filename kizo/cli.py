"""``kizo``: the one command. Bad input is a one-line message and a non-zero exit, never a trace.

Every subcommand is named once in ``TABLE`` with its help line and the module that defines it (a
``COMMANDS`` list of ``infra.commands.Command``). Only the module of the command that runs is
imported, by name: ``kizo api``, ``kizo worker``, ``kizo janitor`` and ``kizo up`` never load the
chaos harness, the benches or the load test, and ``kizo migrate`` does not pay for the web stack.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

from infra.addresses import AddressInUse
from infra.commands import Command, UsageError
from infra.config import Config, ConfigError

# name: (module defining it, help), in the order ``kizo --help`` lists them.
TABLE: dict[str, tuple[str, str]] = {
    "up": ("kizo.supervisor", "run the whole system until Ctrl-C"),
    "migrate": ("kizo.cli", "apply pending database migrations"),
    "db-shell": ("kizo.cli", "open psql on Kizo's database"),
    "api": ("api.cli", "serve the REST API"),
    "worker": ("actors.cli", "run a settlement worker"),
    "janitor": ("actors.janitor_cli", "re-drive stuck work, resolve the bank, audit, reconcile"),
    "keys": ("api.cli", "manage the JWT signing keys"),
    "admin": ("api.cli", "create admin users (never through the public API)"),
    "bank": ("chaos.mockbank.cli", "serve the mock bank (the simulated outside world)"),
    "bank-faults": ("chaos.mockbank.cli", "show or set the running bank's faults"),
    "proxy": ("chaos.proxy.cli", "serve the fault proxy (Toxiproxy's HTTP API)"),
    "chaos": ("chaos.cli", "run the bank workload and check it (Jepsen-style)"),
    "bench": ("kizo.bench_cli", "run a benchmark and print its figures"),
    "loadtest": ("kizo.loadtest", "locust against a scratch system, then check settlement"),
    "incident": ("infra.incident", "draw the incident view from Prometheus to a PNG"),
}


def _migrate(config: Config, _args: argparse.Namespace) -> int:
    from infra import aio
    from infra.processes import prepare_database
    from infra.servers import EmbeddedPostgres

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
    from infra.servers import pg_bin_dir

    if config.embedded_postgres:
        from infra.servers import port_open

        if not port_open(config.host, config.pg_port):
            raise UsageError("embedded PostgreSQL is not running; start it with `kizo up`")
    return subprocess.call([str(pg_bin_dir() / "psql"), config.pg_url()])


COMMANDS = [Command("migrate", _migrate), Command("db-shell", _db_shell)]


def load_command(name: str) -> Command:
    """The command ``name`` from its module (imported now, and only now)."""
    module = importlib.import_module(TABLE[name][0])
    commands: list[Command] = module.COMMANDS
    return next(command for command in commands if command.name == name)


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the ``selected`` command is loaded and gets its options."""
    parser = argparse.ArgumentParser(prog="kizo", description="Kizo wallet settlement engine")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_line) in TABLE.items():
        child = sub.add_parser(name, help=help_line, description=help_line)
        if name == selected:
            command = load_command(name)
            command.configure(child)
            child.set_defaults(handler=command.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # kizo has no options of its own that take a value: the first word is the command.
    selected = next((word for word in argv if not word.startswith("-")), None)
    parser = build_parser(selected if selected in TABLE else None)
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    from infra import logs

    logs.configure(args.command)  # JSON on stderr (a console rendering on a terminal)
    try:
        config = Config.from_env(os.environ)
        code = int(args.handler(config, args))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except (ConfigError, UsageError) as exc:
        print(f"kizo: {exc}", file=sys.stderr)
        return 2
    except AddressInUse as exc:
        print(f"kizo {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_gone()
    except Exception as exc:
        if not _unreachable(exc):
            raise
        reason = f"{type(exc).__name__}: {exc}"
        print(f"kizo {args.command}: cannot reach a server it needs ({reason}); "
              "check DATABASE_URL, REDIS_URL and KIZO_BANK_URL", file=sys.stderr)  # fmt: skip
        return 1


def _reader_gone() -> int:
    """The reader of our output closed it (``kizo chaos list | head -1``): it has what it
    wanted, so exit quietly and successfully, as ``head`` expects. Standard output is pointed at
    /dev/null first, so the interpreter's own flush at exit cannot fail again and warn."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0


def _unreachable(exc: BaseException) -> bool:
    """A refused, lost or timed-out connection to PostgreSQL, Redis or the bank at start-up:
    an operator's problem to name in one line, not a trace. Classified by the libraries'
    own exception families, which this module does not import (they are heavy)."""
    if isinstance(exc, OSError | TimeoutError):
        return True
    module = type(exc).__module__.split(".")[0]
    names = {cls.__name__ for cls in type(exc).__mro__}
    return (module == "asyncpg" and bool(names & {"PostgresConnectionError", "InterfaceError",
                                                   "CannotConnectNowError"})) or (
        module == "redis" and bool(names & {"ConnectionError", "TimeoutError"})
    )  # fmt: skip


if __name__ == "__main__":
    # Run through the canonical module: under ``python -m`` this file is ``__main__``, and the
    # table names ``kizo.cli`` for its own commands.
    from kizo.cli import main as canonical_main

    raise SystemExit(canonical_main())

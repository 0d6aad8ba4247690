"""Logging for every Kizo process, configured here and only here (docs/observability.md).

One JSON object per event on stderr; a human console rendering only when stderr is a terminal.
Context that outlives one call (a request id, a user id, a transaction or job id) is bound with
structlog's contextvars, so every event of a request or a job carries it without passing it
around. The standard library's loggers (SAQ, Quart, asyncio) go through the same renderer.

Secrets are kept out by construction (nothing logs a password, token or key); ``_redact`` is the
second line of defence: a field whose name says secret never reaches the output.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

# A field whose name matches is replaced, whatever its value: the names of secrets, not guesses
# at what a secret's value looks like.
SECRET_FIELD = re.compile(
    r"passw|token|authorization|cookie|pepper|secret|keyring_key|signing_key|private", re.I
)
REDACTED = "[redacted]"
_configured: list[str] = []


class _NamedLogger(structlog.WriteLogger):
    """A write logger that remembers the name ``structlog.get_logger(name)`` was called with."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name

    def msg(self, message: str) -> None:
        # A log line is never worth a request: a closed or broken stream (a terminal gone, a
        # pipe whose reader left) drops the line instead of failing the caller.
        with contextlib.suppress(ValueError, OSError):
            super().msg(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _Factory:
    def __init__(self, file: TextIO) -> None:
        self.file = file

    def __call__(self, *args: Any) -> _NamedLogger:
        return _NamedLogger(self.file, str(args[0]) if args else "kizo")


def _add_names(role: str) -> Processor:
    def add(logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("logger", getattr(logger, "name", "kizo"))
        event_dict.setdefault("process", role)
        return event_dict

    return add


def _redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    for key in [k for k in event_dict if SECRET_FIELD.search(k)]:
        event_dict[key] = REDACTED
    return event_dict


def _renderer(tty: bool) -> Processor:
    if tty:
        return structlog.dev.ConsoleRenderer(colors=False)
    return structlog.processors.JSONRenderer(sort_keys=False)


def configure(role: str, *, stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Configure structlog and the standard library's root logger for a process whose role is
    ``role`` (api, worker, janitor, bank, proxy, chaos, …). Called again, it reconfigures (a
    granian worker process calls it from the app factory; ``kizo`` already did in the parent)."""
    out = stream if stream is not None else sys.stderr
    tty = out.isatty()
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_names(role),
        _redact,
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            _renderer(tty),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_Factory(out),
        cache_logger_on_first_use=True,
    )
    _stdlib(out, shared, tty, level)
    _configured[:] = [role]


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler this module installs (and replaces when configured again)."""


def _stdlib(out: TextIO, shared: list[Processor], tty: bool, level: int) -> None:
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _renderer(tty),
        ],
    )
    handler = _Handler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:  # ours, not a test's
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries speak at warning and above: httpx alone logs every request at info, which on
    # a worker's bank calls or a load generator is noise that costs throughput.
    root.setLevel(max(level, logging.WARNING))


def configured_role() -> str | None:
    """The role of the last ``configure`` in this process, or None."""
    return _configured[0] if _configured else None


def bind(**fields: object) -> None:
    """Bind ``fields`` to every event of the current context (a request, a job)."""
    structlog.contextvars.bind_contextvars(**fields)


def clear() -> None:
    structlog.contextvars.clear_contextvars()

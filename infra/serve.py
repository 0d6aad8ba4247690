"""Serve an ASGI app factory with granian (about 2x hypercorn here) on uvloop."""

from __future__ import annotations


def serve_asgi(target: str, host: str, port: int, *, workers: int = 1) -> None:
    """Block serving ``target`` ("module:factory"); granian handles SIGINT/SIGTERM gracefully."""
    from granian.constants import Interfaces, Loops
    from granian.log import LogLevels
    from granian.server import Server

    Server(
        target,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        workers=workers,
        loop=Loops.uvloop,
        factory=True,
        log_level=LogLevels.warning,
        log_access=False,
        workers_kill_timeout=10,
    ).serve()

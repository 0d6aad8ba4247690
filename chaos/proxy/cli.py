"""``kizo proxy``: the fault proxy (Toxiproxy's HTTP API on ``KIZO_PROXY_API_PORT``, 8474).

``kizo up`` starts it first, with the proxies of ``toxiproxy/toxiproxy.json`` (or of
``KIZO_PROXY_FILE``; ``none`` for no proxies). The proxies named postgres, redis and bank have
their upstream set to where this configuration runs those services, so the shipped file serves
any ports. Kizo's own processes connect directly; scenarios point them at the proxies.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from infra.commands import Command, bounded_int
from infra.config import Config

if TYPE_CHECKING:
    from chaos.proxy.model import ProxySpec

RUN_DIR = "run"  # under KIZO_HOME: where the proxy reports the port it bound


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=bounded_int(0, 2**31), default=0,
                        help="seed of the toxicity dice, for repeatable runs")  # fmt: skip


def _serve(config: Config, args: argparse.Namespace) -> int:
    import trio

    from chaos.proxy.model import ApiError, parse_address
    from infra.addresses import AddressInUse, ensure_free

    path = _source(config)
    try:
        specs = [] if path is None else _load(config, path)
    except (OSError, ValueError, ApiError) as exc:
        print(f"kizo proxy: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    # Said before anything binds; a bind lost to a race after this is the same one line.
    ensure_free(config.host, config.proxy_api_port, "KIZO_PROXY_API_PORT")
    for spec in specs:
        host, port = parse_address(spec.listen, "listen")
        ensure_free(host, port, f"KIZO_PROXY_FILE (proxy {spec.name} of {path})")
    try:
        trio.run(_run, config, specs, args.seed)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, AddressInUse):
            raise leaf from None
        if not isinstance(leaf, OSError | ApiError):
            raise
        print(f"kizo proxy: cannot serve: {leaf}", file=sys.stderr)
        return 1
    return 0


def _source(config: Config) -> Path | None:
    """The proxies file this configuration names; None for ``none``."""
    from chaos.proxy.server import PROXIES_FILE

    if config.proxy_file.lower() == "none":
        return None
    return Path(config.proxy_file) if config.proxy_file else PROXIES_FILE


def _load(config: Config, path: Path) -> list[ProxySpec]:
    """The file's proxies, with the upstreams of postgres, redis and bank set to where this
    configuration runs them."""
    from chaos.proxy.server import load_specs

    ours = config.proxied_services()
    return [dataclasses.replace(s, upstream=ours.get(s.name, s.upstream)) for s in load_specs(path)]


async def _run(config: Config, specs: list[ProxySpec], seed: int) -> None:
    """Serve; once the API listens, its port is written to ``$KIZO_HOME/run/proxy.port`` (with
    ``KIZO_PROXY_API_PORT=0`` that is the only way to learn it)."""
    import trio

    from chaos.proxy.server import serve
    from infra.ports import report_port

    async with trio.open_nursery() as nursery:
        _collection, bound = await nursery.start(serve, config.host, config.proxy_api_port,
                                                 specs, seed)  # fmt: skip
        report_port(config.home / RUN_DIR, "proxy", bound)


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested one-exception groups (trio's nurseries wrap them)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


COMMANDS = [
    Command("proxy", _serve, _configure),
]

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

from kizo.cli import Command, bounded_int, register
from kizo.config import Config
from kizo.supervisor import Child, register_child


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=bounded_int(0, 2**31), default=0,
                        help="seed of the toxicity dice, for repeatable runs")  # fmt: skip


def _serve(config: Config, args: argparse.Namespace) -> int:
    import trio

    from chaos.proxy.model import ApiError
    from chaos.proxy.server import PROXIES_FILE, load_specs, serve

    specs = []
    if config.proxy_file.lower() != "none":
        path = Path(config.proxy_file) if config.proxy_file else PROXIES_FILE
        try:
            specs = load_specs(path)
        except (OSError, ValueError, ApiError) as exc:
            print(f"kizo proxy: cannot read {path}: {exc}", file=sys.stderr)
            return 2
        ours = config.proxied_services()
        specs = [dataclasses.replace(s, upstream=ours.get(s.name, s.upstream)) for s in specs]
    try:
        trio.run(serve, config.host, config.proxy_api_port, specs, args.seed)
    except (OSError, ApiError) as exc:
        print(f"kizo proxy: cannot serve: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def _children(config: Config) -> list[Child]:
    url = f"http://{config.host}:{config.proxy_api_port}"
    return [Child("proxy", ["proxy"], f"{url}/version", url)]  # Toxiproxy has no /health


register(Command("proxy", "serve the fault proxy (Toxiproxy's HTTP API)", _serve, _configure))
register_child(_children)

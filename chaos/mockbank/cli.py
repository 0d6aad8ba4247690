"""``kizo bank`` (serve the mock bank) and ``kizo bank-faults`` (set its faults); ``kizo up``
starts the bank first, before any process that may call it."""

from __future__ import annotations

import argparse
import json

from kizo.cli import Command, UsageError, register
from kizo.config import Config
from kizo.supervisor import Child, register_child


def _serve(config: Config, _args: argparse.Namespace) -> int:
    from kizo.serve import serve_asgi

    serve_asgi("chaos.mockbank.app:create_app", config.host, config.bank_port)
    return 0


def _rate(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {raw!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _configure_faults(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--error-rate", type=_rate, help="share of payments answered 503, unprocessed"
    )
    parser.add_argument("--latency-ms", type=int, help="delay before each answer (0-10000)")
    parser.add_argument("--drop-rate", type=_rate, help="share processed whose answer is dropped")
    parser.add_argument("--seed", type=int, help="seed of the fault dice, for repeatable runs")
    parser.add_argument("--clear", action="store_true", help="remove every fault")


def _faults(config: Config, args: argparse.Namespace) -> int:
    import httpx

    if args.latency_ms is not None and not 0 <= args.latency_ms <= 10_000:
        raise UsageError("--latency-ms must be between 0 and 10000")
    url = f"http://{config.host}:{config.bank_port}/admin/faults"
    body = {
        k: getattr(args, k)
        for k in ("error_rate", "latency_ms", "drop_rate", "seed")
        if getattr(args, k) is not None
    }
    try:
        with httpx.Client(timeout=5) as client:
            if args.clear:
                response = client.delete(url)
            elif body:
                response = client.put(url, json=body)
            else:
                response = client.get(url)
    except httpx.HTTPError:
        print(f"kizo: the bank is not reachable at {url}")
        return 1
    if response.status_code != 200:
        raise UsageError(f"the bank refused: {response.text[:200]}")
    print(json.dumps(response.json()))
    return 0


def _children(config: Config) -> list[Child]:
    url = f"http://{config.host}:{config.bank_port}"
    return [Child("bank", ["bank"], ready_port=config.bank_port, url=url)]


register(Command("bank", "serve the mock bank (the simulated outside world)", _serve))
register(
    Command("bank-faults", "show or set the running bank's faults", _faults, _configure_faults)
)
register_child(_children)

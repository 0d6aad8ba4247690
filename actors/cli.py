"""``kizo worker``: a settlement worker owning a set of shards; ``kizo up`` runs
``KIZO_WORKERS`` of them (after the bank, before the janitor and the API)."""

from __future__ import annotations

import argparse

from infra.commands import Command, UsageError, bounded_int
from infra.config import Config


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", help="comma-separated shard numbers to own (default: all)")
    parser.add_argument("--index", type=int, default=0, help="this worker's index (with --of)")
    parser.add_argument("--of", type=int, default=1, help="how many workers share the shards")
    parser.add_argument(
        "--lease",
        action="store_true",
        help="hold shards by lease, shared with every other --lease worker on any host "
        "(KIZO_SHARD_LEASE_TTL_S; docs/pipeline.md)",
    )
    parser.add_argument(
        "--metrics-port",
        type=bounded_int(0, 65535),
        default=0,
        help="serve /metrics on this port once consuming (kizo up sets it; default: none)",
    )


def _shards(config: Config, args: argparse.Namespace) -> list[int]:
    from actors.worker import owned_shards

    total = config.pipeline.shards
    if args.lease:
        if args.shards or args.index or args.of != 1:
            raise UsageError("--lease takes no --shards, --index or --of: leases decide")
        return list(range(total))
    if args.shards:
        try:
            shards = sorted({int(s) for s in args.shards.split(",")})
        except ValueError:
            raise UsageError("--shards takes comma-separated integers") from None
        if shards[0] < 0 or shards[-1] >= total:
            raise UsageError(f"shards must be between 0 and {total - 1}")
        return shards
    if not 1 <= args.of <= total or not 0 <= args.index < args.of:
        raise UsageError(f"--index must be in [0, --of) and --of in [1, {total}]")
    return owned_shards(total, args.index, args.of)


def _worker(config: Config, args: argparse.Namespace) -> int:
    from actors.worker import WorkerSpec, main
    from infra import aio
    from infra.addresses import ensure_free

    # Said before the worker connects anywhere, not once it consumes and only then binds.
    ensure_free(
        config.host, args.metrics_port, "--metrics-port (kizo up: KIZO_WORKER_METRICS_PORT)"
    )

    spec = WorkerSpec(
        config.pg_url(),
        config.valkey_url(),
        config.bank_url(),
        _shards(config, args),
        args.metrics_port,
        config.pipeline.shard_lease_ttl_s if args.lease else 0.0,
    )
    aio.run(main(config, spec))
    return 0


COMMANDS = [
    Command("worker", _worker, _configure),
]

"""The fault proxy process: the HTTP API and every proxy in one trio run."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chaos.proxy import model
from chaos.proxy.api import resolved_listen, serve_connection
from chaos.proxy.core import Collection

PROXIES_FILE = Path(__file__).resolve().parents[2] / "toxiproxy" / "toxiproxy.json"


class _ProxyMetrics(Collector):
    def __init__(self, collection: Collection) -> None:
        self.collection = collection

    def collect(self) -> Iterable[Metric]:
        accepted = CounterMetricFamily("kizo_proxy_connections", "Connections accepted",
                                       labels=["proxy"])  # fmt: skip
        sent = CounterMetricFamily("kizo_proxy_bytes", "Bytes passed on",
                                   labels=["proxy", "stream"])  # fmt: skip
        toxics = GaugeMetricFamily("kizo_proxy_toxics", "Toxics in place", labels=["proxy"])
        by_type = GaugeMetricFamily("kizo_proxy_toxics_active", "Toxics in place by type",
                                    labels=["proxy", "type"])  # fmt: skip
        enabled = GaugeMetricFamily("kizo_proxy_enabled", "1 when listening", labels=["proxy"])
        for name, proxy in self.collection.proxies.items():
            accepted.add_metric([name], proxy.counters.accepted)
            for stream, n in proxy.counters.bytes.items():
                sent.add_metric([name, stream], n)
            toxics.add_metric([name], len(proxy.toxics))
            # Every type, 0 when absent: a fault window's end is a 0, not a vanished series.
            present = Counter(toxic.type for toxic in proxy.toxics)
            for kind in model.TOXIC_TYPES:
                by_type.add_metric([name, kind], present[kind])
            enabled.add_metric([name], 1 if proxy.enabled else 0)
        yield from (accepted, sent, toxics, by_type, enabled)


def load_specs(path: Path) -> list[model.ProxySpec]:
    """Proxies from a Toxiproxy-format file, read as its -config flag reads it (populate's
    rules; an empty listen is any free port on 127.0.0.1)."""
    return [resolved_listen(spec) for spec in model.populate_specs(model.load(path.read_bytes()))]


async def serve(host: str, port: int, specs: Sequence[model.ProxySpec], seed: int = 0,
                *, task_status: trio.TaskStatus[tuple[Collection, int]]
                = trio.TASK_STATUS_IGNORED) -> None:  # fmt: skip
    """Serve until cancelled; ``task_status`` gets the collection and the API's bound port."""
    async with trio.open_nursery() as nursery:
        collection = Collection(nursery, seed)
        for spec in specs:
            await collection.add(spec)
        registry = CollectorRegistry()
        registry.register(_ProxyMetrics(collection))

        async def handle(stream: trio.SocketStream) -> None:
            await serve_connection(stream, collection, lambda: generate_latest(registry))

        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        task_status.started((collection, bound))
        await trio.serve_listeners(handle, listeners)

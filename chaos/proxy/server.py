"""The fault proxy process: the HTTP API and every proxy in one trio run."""

from __future__ import annotations

import platform
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
from infra.addresses import AddressInUse, is_in_use

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
        # Toxiproxy's own (its collectors/proxy.go, labels in the order Go sorts them), so its
        # dashboards and checks read this proxy too. It adds a link's bytes when the link ends;
        # these count as the bytes move, and agree with it once the connections have closed.
        labels = ["direction", "listener", "proxy", "upstream"]
        received = CounterMetricFamily(
            "toxiproxy_proxy_received_bytes", "Bytes read from the source side", labels=labels
        )
        passed = CounterMetricFamily(
            "toxiproxy_proxy_sent_bytes", "Bytes written to the destination side", labels=labels
        )
        for name, proxy in self.collection.proxies.items():
            accepted.add_metric([name], proxy.counters.accepted)
            for stream, n in proxy.counters.bytes.items():
                sent.add_metric([name, stream], n)
                series = [stream, proxy.spec.listen, name, proxy.spec.upstream]
                received.add_metric(series, proxy.counters.received[stream])
                passed.add_metric(series, n)
            toxics.add_metric([name], len(proxy.toxics))
            # Every type, 0 when absent: a fault window's end is a 0, not a vanished series.
            present = Counter(toxic.type for toxic in proxy.toxics)
            for kind in model.TOXIC_TYPES:
                by_type.add_metric([name, kind], present[kind])
            enabled.add_metric([name], 1 if proxy.enabled else 0)
        yield from (accepted, sent, toxics, by_type, enabled, received, passed)


class _RuntimeMetrics(Collector):
    """What Toxiproxy's -runtime-metrics adds and its end-to-end check reads (``go_info``,
    ``go_goroutines``), said of this runtime: the interpreter's version in the label, and the
    trio tasks alive (a relay direction is a task here as it is a goroutine there). Read while
    serving /metrics, inside the trio run."""

    def collect(self) -> Iterable[Metric]:
        version = f"python{platform.python_version()} trio{trio.__version__}"
        info = GaugeMetricFamily("go_info", "The runtime (Python and trio here, not Go)",
                                 labels=["version"])  # fmt: skip
        info.add_metric([version], 1)
        tasks = GaugeMetricFamily("go_goroutines", "Tasks alive in the proxy's trio run "
                                  "(Toxiproxy's -runtime-metrics name)")  # fmt: skip
        tasks.add_metric([], _tasks_alive())
        yield from (info, tasks)


def _tasks_alive() -> int:
    """Every task of the trio run, walked down from its root (bounded: the tree is finite)."""
    root = trio.lowlevel.current_root_task()
    count, pending = 0, [] if root is None else [root]
    while pending:
        task = pending.pop()
        count += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return count


def load_specs(path: Path) -> list[model.ProxySpec]:
    """Proxies from a Toxiproxy-format file, read as its -config flag reads it (populate's
    rules; an empty listen is any free port on 127.0.0.1)."""
    return [resolved_listen(spec) for spec in model.populate_specs(model.load(path.read_bytes()))]


async def serve(host: str, port: int, specs: Sequence[model.ProxySpec], seed: int = 0,
                *, task_status: trio.TaskStatus[tuple[Collection, int]]
                = trio.TASK_STATUS_IGNORED) -> None:  # fmt: skip
    """Serve until cancelled; ``task_status`` gets the collection and the API's bound port.
    The API's address is bound first, outside any nursery: taken, it is one ``AddressInUse``
    (not an exception group), and no proxy has started."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        if is_in_use(exc):
            raise AddressInUse(host, port, "KIZO_PROXY_API_PORT") from None
        raise
    try:
        await _serve_on(listeners, specs, seed, task_status)
    finally:
        with trio.CancelScope(shield=True):  # closed here, never left to the collector
            for listener in listeners:
                await listener.aclose()


async def _serve_on(listeners: list[trio.SocketListener], specs: Sequence[model.ProxySpec],
                    seed: int, task_status: trio.TaskStatus[tuple[Collection, int]],
                    ) -> None:  # fmt: skip
    async with trio.open_nursery() as nursery:
        collection = Collection(nursery, seed)
        for spec in specs:
            await collection.add(spec)
        registry = CollectorRegistry()
        registry.register(_ProxyMetrics(collection))
        registry.register(_RuntimeMetrics())

        async def handle(stream: trio.SocketStream) -> None:
            await serve_connection(stream, collection, lambda: generate_latest(registry))

        bound = listeners[0].socket.getsockname()[1]
        task_status.started((collection, bound))
        await trio.serve_listeners(handle, listeners)

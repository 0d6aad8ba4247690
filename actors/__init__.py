"""Settlement: shard routing and SAQ queues, per-account actors, the worker process, the janitor.

Public surface for the API: ``QueueSet`` (the shards' queues), ``Coalescer`` (concurrent
requests' intents become grouped jobs), ``Routed`` and ``actor_account`` (which shard owns an
intent). Everything else is this package's own.
"""

from actors.routing import Coalescer, QueueSet, Routed, actor_account

__all__ = ["Coalescer", "QueueSet", "Routed", "actor_account"]

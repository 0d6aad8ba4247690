"""Settlement: shard routing and SAQ queues, per-account actors, the worker process, the janitor.

Public surface for the API: ``QueueSet`` (the shards' queues), ``Coalescer`` (concurrent
requests' intents become grouped jobs), ``Routed`` and ``actor_account`` (which shard owns an
intent); ``flagged_intents`` and ``rearm_flagged`` (the operator's view and re-arm of intents
flagged ``needs_attention``). Everything else is this package's own.
"""

from actors.janitor import flagged_intents, rearm_flagged
from actors.routing import Coalescer, QueueSet, Routed, actor_account

__all__ = ["Coalescer", "QueueSet", "Routed", "actor_account", "flagged_intents", "rearm_flagged"]

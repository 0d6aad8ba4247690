"""The REST API (Quart). Public surface: ``create_app`` (``api.app``, the factory that wires
state, error handlers and the per-resource blueprints of ``api.routes``) and ``document`` (the
OpenAPI 3.1 document of an app). They load on first use: ``kizo api`` imports ``api.cli``
before it needs Quart, and other commands never pay for it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_app": "api.app",
    "document": "api._openapi",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'api' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

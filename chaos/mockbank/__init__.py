"""The mock bank: the simulated outside world, in its own process and its own database.

Public surface: ``BankSettings`` and ``settings_from_env`` / ``bank_database_url``
(``chaos.mockbank.settings``), ``create_app`` / ``create_asgi`` (``chaos.mockbank.app``),
``serve`` (``chaos.mockbank.server``), ``Faults`` (``chaos.mockbank.faults``). They load on first
use: ``kizo bank`` imports this package and must stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BankSettings": "chaos.mockbank.settings",
    "bank_database_url": "chaos.mockbank.settings",
    "settings_from_env": "chaos.mockbank.settings",
    "create_app": "chaos.mockbank.app",
    "create_asgi": "chaos.mockbank.app",
    "serve": "chaos.mockbank.server",
    "Faults": "chaos.mockbank.faults",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'chaos.mockbank' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

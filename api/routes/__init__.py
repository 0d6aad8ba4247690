"""The API's routes, one blueprint per resource; ``api.app.create_app`` registers them all.

Each route is declared with its OpenAPI operation (``api._openapi.Resource``), so the document
at /openapi.json covers every route the app serves.
"""

from __future__ import annotations

from api._openapi import Resource
from api.routes import _admin, _auth, _history, _operations, _payments, _web

BLUEPRINTS: tuple[Resource, ...] = (_auth.bp, _payments.bp, _history.bp, _admin.bp,
                                    _operations.bp, _web.bp)  # fmt: skip
# Rate-limited per caller beyond the per-IP default (api._edges.install).
SIGNIN, SIGNUP = "auth.signin", "auth.signup"
PAYMENTS = ("payments.deposit", "payments.withdraw", "payments.transfer")
__all__ = ["BLUEPRINTS", "PAYMENTS", "SIGNIN", "SIGNUP"]

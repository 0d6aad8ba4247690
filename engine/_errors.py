"""Errors are values with names; the API maps each to one problem+json type in one place."""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every rule the ledger refuses; the message is safe to show a user."""

    code = "ledger_error"


class InvalidAmount(LedgerError):
    code = "invalid_amount"


class UnknownAccount(LedgerError):
    code = "unknown_account"


class SelfTransfer(LedgerError):
    code = "self_transfer"


class CurrencyMismatch(LedgerError):
    code = "currency_mismatch"


class UnknownTransaction(LedgerError):
    code = "unknown_transaction"


class InvariantViolation(AssertionError):
    """Code that owns an invariant found it broken: fail loudly rather than corrupt money."""


class RetriesExhausted(RuntimeError):
    """A batch kept hitting serialization failures or deadlocks past its retry bound."""

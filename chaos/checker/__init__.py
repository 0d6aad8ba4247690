"""The Jepsen-style checker: a history of operations (invoke, then ok / fail / unknown) against
the final ledger, the API's view and the bank's record; each rule a function, each breach a
named ``Violation``."""

from chaos.checker._check import (
    FINAL,
    RULES,
    ApiView,
    FinalState,
    LedgerTxn,
    Op,
    Violation,
    check,
)

__all__ = ["FINAL", "RULES", "ApiView", "FinalState", "LedgerTxn", "Op", "Violation", "check"]

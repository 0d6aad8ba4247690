"""The locust load test on a small run: every request answered as promised, and every accepted
transfer settled (matched key by key against the ledger), with a hot merchant in the mix."""

from __future__ import annotations

from kizo.loadtest import ok, run, text


def test_every_accepted_transfer_settles_under_locust_load() -> None:
    report = run(users=8, seconds=8, spawn_rate=8, merchant_share=30)
    assert report["failures"] == [], text(report)
    # Enough transfers that "all settled" means something; a user's first transfer waits for
    # its sign-up (hashing yields to payments) and its deposit to settle, which on a crowded
    # 2-core machine took most of a 5 s run: 8 s leaves room, and no rate is judged here.
    assert report["transfers_accepted"] > 20, text(report)
    assert report["transfers_settled"] == report["transfers_accepted"], text(report)
    assert report["transfers_accepted_not_in_ledger"] == 0
    assert report["transfers_pending_after_wait"] == 0 and report["transfers_failed"] == 0
    assert report["requests"]["transfer (replay)"]["requests"] > 0  # the replay check ran
    assert ok(report)
    assert not ok({**report, "transfers_settled": report["transfers_settled"] - 1})

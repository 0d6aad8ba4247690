"""Toxiproxy's own Node client (toxiproxy-node-client 4.1.0, pinned in tests/node, installed by
`make test` with npm ci) drives the fault proxy unchanged: a proxy's and a toxic's whole
lifecycle, a latency toxic seen on a real connection, a disabled proxy refusing, reset and
delete (tests/node/check.js)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from infra.readiness import http_probe, wait_ready
from infra.servers import free_port, stop_process

NODE_DIR = Path(__file__).resolve().parent / "node"


def test_toxiproxys_node_client_drives_the_fault_proxy_unchanged() -> None:
    node = shutil.which("node")
    assert node, "no node: `make test` installs Debian's nodejs when it is missing"
    assert (NODE_DIR / "node_modules" / "toxiproxy-node-client").is_dir(), "run make test"
    port = free_port()
    env = {**os.environ, "KIZO_PROXY_API_PORT": str(port), "KIZO_PROXY_FILE": "none"}
    proxy = subprocess.Popen([sys.executable, "-m", "kizo.cli", "proxy"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_ready("kizo proxy", http_probe(f"http://127.0.0.1:{port}/version"), proc=proxy)
        done = subprocess.run([node, "check.js", f"http://127.0.0.1:{port}", str(free_port())],
                              cwd=NODE_DIR, capture_output=True, text=True, timeout=60,
                              check=False)  # fmt: skip
    finally:
        stop_process(proxy)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert json.loads(seen["version"]) == {"version": "2.12.0"}
    assert seen["toxic_ms"] >= 200 > seen["after_reset_ms"]
    assert "404" in seen["missing"]

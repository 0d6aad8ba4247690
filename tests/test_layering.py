"""The package arrows hold where they matter: in the processes that run in production, and in
import-linter's contracts (which `make test` runs), shown to catch a broken arrow."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from infra.servers import free_port
from tests._imports import PACKAGES, recorded_modules, recording_env
from tests.conftest import ServerSet, kizo_env, stop_process, wait_http

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60.0


def _modules_of(args: list[str], env: dict[str, str], tmp: Path, ready_url: str) -> set[str]:
    """Run ``kizo <args>`` with every Python process of its tree recording its modules; stop it
    (SIGTERM) once ``ready_url`` answers: the process is then serving, its code all loaded."""
    records = tmp / args[0]
    records.mkdir()
    command = [sys.executable, "-m", "kizo.cli", *args]
    proc = subprocess.Popen(command, env=recording_env(records, env), stdin=subprocess.DEVNULL)
    try:
        wait_http(ready_url, timeout_s=START_TIMEOUT_S, proc=proc)
    finally:
        stop_process(proc)
    return recorded_modules(records)


def test_production_processes_never_import_the_chaos_harness(
    servers: ServerSet, sync_db_url: str, tmp_path: Path
) -> None:
    api_port, janitor_port, worker_port = free_port(), free_port(), free_port()
    env = kizo_env(servers, sync_db_url, KIZO_API_PORT=str(api_port),
                   KIZO_JANITOR_METRICS_PORT=str(janitor_port))  # fmt: skip
    runs = {
        "api": (_modules_of(["api"], env, tmp_path, f"http://127.0.0.1:{api_port}/health"),
                "api.app"),
        "janitor": (_modules_of(["janitor"], env, tmp_path, f"http://127.0.0.1:{janitor_port}/metrics"),
                    "actors.janitor_main"),
        "worker": (_modules_of(["worker", "--metrics-port", str(worker_port)], env, tmp_path,
                               f"http://127.0.0.1:{worker_port}/metrics"), "actors.worker"),
    }  # fmt: skip
    for role, (modules, own) in runs.items():
        # The record must show the process's own code, or an empty record would pass.
        assert own in modules, f"{role}: no {own} in {sorted(modules)}"
        harness = sorted(m for m in modules if m.split(".")[0] == "chaos")
        assert harness == [], f"kizo {role} imported the chaos harness: {harness}"


def test_import_linter_catches_a_broken_arrow(tmp_path: Path) -> None:
    """The contracts in pyproject.toml pass on the tree, and fail on a copy where the API
    imports the chaos harness."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    lint = [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(lint, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip

    clean = run()
    assert clean.returncode == 0, clean.stdout + clean.stderr
    broken = tmp_path / "api" / "_problems.py"
    broken.write_text(broken.read_text() + "\nimport chaos.checker  # noqa\n")
    result = run()
    assert result.returncode != 0
    assert "production code never imports the chaos harness BROKEN" in result.stdout

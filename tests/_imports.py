"""Which modules a process tree loads: a ``sitecustomize`` put first on PYTHONPATH adds a
finder to every Python process of the tree that writes down each of our modules as it is first
looked for. It sees ``importlib.import_module`` too (which ``-X importtime`` does not log) and
needs no clean exit (granian's workers leave with ``os._exit``)."""

from __future__ import annotations

from pathlib import Path

PACKAGES = ("kizo", "infra", "engine", "actors", "api", "chaos")
_RECORDER = """
import os, sys

class _Recorder:
    def __init__(self):
        self.path = os.path.join(os.environ["KIZO_TEST_MODULES_DIR"], f"{os.getpid()}.modules")

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in PACKAGES:
            with open(self.path, "a") as out:
                out.write(fullname + "\\n")
        return None  # let the real finders find it

PACKAGES = %r
sys.meta_path.insert(0, _Recorder())
"""


def recording_env(directory: Path, env: dict[str, str]) -> dict[str, str]:
    """``env`` for a process tree whose processes record their modules in ``directory``."""
    (directory / "sitecustomize.py").write_text(_RECORDER % (PACKAGES,))
    path = env.get("PYTHONPATH", "")
    return {**env, "KIZO_TEST_MODULES_DIR": str(directory),
            "PYTHONPATH": f"{directory}:{path}" if path else str(directory)}  # fmt: skip


def recorded_modules(directory: Path, pid: int | None = None) -> set[str]:
    """Our modules that the recorded processes (or only process ``pid``) looked for."""
    pattern = f"{pid}.modules" if pid is not None else "*.modules"
    names: set[str] = set()
    for path in directory.glob(pattern):
        names |= set(path.read_text().split())
    return names

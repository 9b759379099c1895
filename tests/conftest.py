"""Suite-wide test setup: subprocesses find this checkout; Triton kernels run in the interpreter without a GPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # st_common
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# torchrun children must import scaletrain from this checkout even when it is not installed.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
# Set before anything imports triton: without a GPU the kernels run in Triton's interpreter.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist each worker gets its share of the cores. With torch's default of one intra-op
# thread per core, 2 workers on 2 cores ran 4 threads, and a DiT step measured 0.79 s instead of
# 0.21 s with one thread each. Subprocesses inherit the variable unless a test sets its own.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _XDIST_WORKERS)))


def _shared_fixtures(item: pytest.Item) -> list[tuple[str, str]]:
    """(scope, id) of the module- and session-scoped fixtures defined under tests/ that `item` uses."""
    found = []
    for defs in item._fixtureinfo.name2fixturedefs.values():
        fixture = defs[-1]  # the definition that applies to this item (a closer conftest overrides)
        if fixture.scope in ("module", "session") and fixture.baseid.startswith("tests"):
            found.append((fixture.scope, f"{fixture.baseid}::{fixture.argname}"))
    return found


@pytest.hookimpl(tryfirst=True)  # before xdist turns the marks into scheduling groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`-n N --dist loadgroup`; not the default, see README "Tests") every test is its
    own unit of work, except tests that share an expensive fixture: a module-scoped reference run is built once per
    worker, and a session-scoped one (a live Slurm cluster, the checkpoint tests' straight runs) once per
    worker too. So a module with shared fixtures goes to one worker whole, and modules sharing a session
    fixture go together: each reference run is computed once and one Slurm cluster starts, never two.
    """
    parent: dict[str, str] = {}  # union-find over module ids and session-fixture ids

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    grouped = []
    for item in items:
        shared = _shared_fixtures(item)
        if not shared:
            continue
        module = item.nodeid.split("::")[0]
        for scope, fixture_id in shared:
            if scope == "session":
                parent[root(fixture_id)] = root(module)
        grouped.append((item, module))
    for item, module in grouped:
        item.add_marker(pytest.mark.xdist_group(root(module)))

"""Packaging: scaletrain installs one import name and its layers import one way.

A top-level `kernels` package of ours once shadowed the unrelated `kernels` package that transformers
imports (and the reverse), so a fresh install failed its own tests. These tests fail if anything but
`scaletrain` becomes importable at the top level again, if transformers' hub-kernels integration cannot be
imported from the repository root, or if a layer imports against the direction recipes -> core -> kernels,
launchers -> core.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import distribution, entry_points
from pathlib import Path

import pytest
from st_common import REPO

PACKAGE = REPO / "scaletrain"


def test_the_wheel_holds_only_the_scaletrain_namespace(tmp_path):
    # Build from a copy so the checkout gets no build/ or egg-info; offline, with the installed setuptools.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(PACKAGE, src / "scaletrain", ignore=shutil.ignore_patterns("__pycache__", "*.tokcache.npy"))
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
        timeout=300,
    )
    (wheel,) = out.glob("scaletrain-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = {name.split("/", 1)[0] for name in names}
        dist_info = next(n for n in top_level if n.endswith(".dist-info"))
        declared = archive.read(f"{dist_info}/top_level.txt").decode().split()
    assert top_level == {"scaletrain", dist_info}, sorted(top_level)
    assert declared == ["scaletrain"], declared
    # The configs and data the README's commands read ship inside the package.
    assert "scaletrain/recipes/gpt/configs/tiny.yaml" in names
    assert "scaletrain/data/corpus/stdlib_corpus.txt" in names


def test_installed_entry_points_stay_inside_the_namespace():
    dist = distribution("scaletrain")
    targets = [ep.value for ep in dist.entry_points]
    assert targets, "scaletrain is installed without entry points (the `scaletrain` command)"
    for target in targets:
        assert target.split(":")[0].split(".")[0] == "scaletrain", target
    assert any(ep.name == "launch" for ep in entry_points(group="scaletrain.commands"))


def test_transformers_hub_kernels_imports_from_the_repository_root():
    """The third-party `kernels` (a transformers dependency) must win from the repo root, where pytest and
    `python` put the checkout first on sys.path; if it is not installed, only its absence may fail."""
    pytest.importorskip("transformers")
    probe = (
        "import importlib.util, json, site\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(json.dumps([spec.origin if spec else None, site.getsitepackages()]))\n"
        "import transformers.integrations.hub_kernels\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    found, site_packages = json.loads(proc.stdout.splitlines()[0])
    # Installed packages live in site-packages (which may sit inside the checkout, as CI's venv does).
    installed = found is not None and any(Path(found).is_relative_to(p) for p in site_packages)
    assert found is None or installed, f"a project folder shadows `kernels`: {found}"
    if found is not None:
        assert proc.returncode == 0, proc.stderr[-3000:]


# -- layers ---------------------------------------------------------------------------------------------------

LAYERS = ("kernels", "recipes", "launchers")


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "scaletrain":
        return "external"
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "core"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(module: str, is_package: bool, source: str, runtime_only: bool = False) -> list[str]:
    """Absolute names of everything `module` imports, relative imports resolved; with `runtime_only`, not
    those under `if TYPE_CHECKING:`."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    tree = ast.parse(source)
    if runtime_only:
        visitor = _RuntimeImports()
        visitor.visit(tree)
        nodes = visitor.found
    else:
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            found += [name] + [f"{name}.{alias.name}" for alias in node.names]
    return found


# Which layers each layer may import (besides itself and third-party packages).
ALLOWED = {"kernels": set(), "core": {"kernels"}, "recipes": {"core", "kernels"}, "launchers": {"core"}}


def layer_violations(modules: dict[str, tuple[bool, str]]) -> list[str]:
    """`module name -> (is a package, source)` in, one line per import against the layer order out."""
    bad = []
    for module, (is_package, source) in sorted(modules.items()):
        here = _layer(module)
        for name in _imports(module, is_package, source):
            there = _layer(name)
            if there not in ("external", here) and there not in ALLOWED[here]:
                bad.append(f"{module} ({here}) imports {name} ({there})")
    return bad


def test_imports_point_one_way():
    modules = {_module_name(path): (path.name == "__init__.py", path.read_text()) for path in PACKAGE.rglob("*.py")}
    assert len(modules) > 50 and "scaletrain.kernels.attention" in modules
    bad = layer_violations(modules)
    assert not bad, "\n".join(bad)


def test_the_layer_check_reports_wrong_way_imports():
    # The checker must be able to fail: a core module importing a recipe (absolute) or a launcher (relative),
    # and a kernel importing the core, are each reported; the allowed directions are not.
    modules = {
        "scaletrain.parallel.probe": (False, "from scaletrain.recipes.gpt import model\nfrom ..launchers import cli\n"),
        "scaletrain.kernels.probe": (False, "import scaletrain.ops\nfrom . import reference\n"),
        "scaletrain.recipes.probe": (True, "from scaletrain import ops\nfrom scaletrain.kernels import attention\n"),
    }
    bad = layer_violations(modules)
    assert bad == [
        "scaletrain.kernels.probe (kernels) imports scaletrain.ops (core)",
        "scaletrain.parallel.probe (core) imports scaletrain.recipes.gpt (recipes)",
        "scaletrain.parallel.probe (core) imports scaletrain.recipes.gpt.model (recipes)",
        "scaletrain.parallel.probe (core) imports scaletrain.launchers (launchers)",
        "scaletrain.parallel.probe (core) imports scaletrain.launchers.cli (launchers)",
    ], bad


# -- constraints ----------------------------------------------------------------------------------------------


def test_constraints_pin_every_direct_dependency_but_torch():
    """`-c constraints.txt` (README, .ci/run) must fix the version of each dependency scaletrain names, so an
    upstream release cannot change what CI installs; torch is pinned by the install command instead."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    names = {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[name.lower()] = version
    assert "torch" not in pins and "scaletrain" not in pins
    missing = sorted(names - {"torch"} - set(pins))
    assert not missing, f"constraints.txt pins none of {missing}: run `python scripts/constraints.py write`"


# -- no import cycles between the core's sub-packages ---------------------------------------------------------


class _RuntimeImports(ast.NodeVisitor):
    """The imports a module executes (function-level ones included), not those under `if TYPE_CHECKING:`."""

    def __init__(self) -> None:
        self.found: list[ast.Import | ast.ImportFrom] = []

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append(node)


def core_unit_graph(modules: dict[str, tuple[bool, str]]) -> dict[str, set[str]]:
    """Edges between the core's units (scaletrain.<unit>: a sub-package or a top-level module) that run."""

    def unit(module: str) -> str | None:
        parts = module.split(".")
        if parts[0] != "scaletrain" or len(parts) < 2 or parts[1] in LAYERS:
            return None
        return parts[1]

    graph: dict[str, set[str]] = {}
    for module, (is_package, source) in modules.items():
        for target in _imports(module, is_package, source, runtime_only=True):
            a, b = unit(module), unit(target)
            if a and b and a != b:
                graph.setdefault(a, set()).add(b)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_core_sub_packages_import_without_cycles():
    """config is plain dataclasses (+ the loader, which asks the registry for a recipe's sections); parallel
    reads them; validate sits above both; train, bench and cli above that."""
    modules = {
        _module_name(path): (path.name == "__init__.py", path.read_text()) for path in PACKAGE.rglob("*.py")
    }
    graph = core_unit_graph(modules)
    assert {"config", "parallel", "validate", "train"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_check_sees_a_cycle():
    modules = {
        "scaletrain.config.schema": (False, "from scaletrain.parallel.dims import ParallelDims\n"),
        "scaletrain.parallel.dims": (False, "from ..config.schema import JobConfig\n"),
        "scaletrain.registry": (False, "if TYPE_CHECKING:\n    import scaletrain.train\n"),
    }
    graph = core_unit_graph(modules)
    assert graph == {"config": {"parallel"}, "parallel": {"config"}}  # the TYPE_CHECKING import does not count
    assert find_cycle(graph) == ["config", "parallel", "config"]

"""A family from another package (examples/gru_recipe) plugs in through the `scaletrain.recipes` entry point:
installed (into a folder of its own, as pip would into site-packages), it is listed, its config is checked, and
its data-parallel layouts train like one process — with no scaletrain file naming it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from st_common import REPO

EXAMPLE = REPO / "examples" / "gru_recipe"
CONFIG = EXAMPLE / "scaletrain_gru" / "configs" / "gru-tiny.yaml"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    # From a copy: pip builds in the source folder, which must stay clean.
    source = tmp_path_factory.mktemp("src") / "gru_recipe"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(source)],
        check=True, timeout=300,
    )  # fmt: skip
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}


def _scaletrain(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scaletrain.cli", *argv], env=env, capture_output=True, text=True, timeout=600
    )


def test_the_entry_point_registers_the_family(installed):
    listed = _scaletrain(installed, "recipes")
    assert listed.returncode == 0 and "gru" in listed.stdout.split(), listed.stdout + listed.stderr
    shown = _scaletrain(installed, "config", "show", str(CONFIG))
    assert shown.returncode == 0, shown.stderr
    assert "# checked for a world size of 1" in shown.stdout and "parameters:" in shown.stdout
    refused = _scaletrain(installed, "config", "show", str(CONFIG), "--parallel.tp", "2")
    assert refused.returncode == 2 and "recipe 'gru' has no tensor-parallel plan" in refused.stderr


@pytest.mark.parametrize("layout", ["--parallel.dp_shard 2", "--parallel.dp_replicate 2 --parallel.dp_shard 1"])
def test_its_data_parallel_layouts_match_one_process(installed, layout):
    small = ["--train.steps", "3", "--train.warmup_steps", "1", "--data.seq_len", "32", "--model.dim", "64"]
    done = _scaletrain(installed, "parity", str(CONFIG), "--a", "", "--b", layout, *small)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "PASS: max loss relative difference" in done.stdout


def test_a_family_that_fails_to_import_leaves_the_others_working(tmp_path, monkeypatch):
    """One broken family package (a missing dependency) warns; the other families still load, and asking
    for the broken one raises its import error as the cause."""
    from scaletrain import registry

    for name, body in {"good_family": "VALUE = 1\n", "bad_family": "import not_a_module_anywhere\n"}.items():
        (tmp_path / "fake_recipes" / name).mkdir(parents=True)
        (tmp_path / "fake_recipes" / name / "__init__.py").write_text(body)
    (tmp_path / "fake_recipes" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "RECIPES_PACKAGE", "fake_recipes")
    monkeypatch.setattr(registry, "_discovered", False)
    monkeypatch.setattr(registry, "_RECIPES", {})
    monkeypatch.setattr(registry, "_BROKEN", {})
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    with pytest.warns(UserWarning, match=r"fake_recipes\.bad_family failed to import \(ModuleNotFoundError"):
        registry.discover_recipes()
    assert list(registry._BROKEN) == ["fake_recipes.bad_family"]
    with pytest.raises(ValueError, match=r"'bad_family' is in fake_recipes\.bad_family, which failed") as info:
        registry.get_recipe("bad_family")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    with pytest.raises(ValueError, match=r"unknown recipe 'other'.*failed to import: \['fake_recipes\.bad_family'\]"):
        registry.get_recipe("other")

"""The `scaletrain` command: every subcommand has --help, and bad input is one line naming the field or
path with exit code 2 — checked before any process or model exists. Only bugs print tracebacks."""

from __future__ import annotations

import re

import pytest
from st_common import TINY

from scaletrain import cli


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # commands built on argparse (export, import, launch) exit from --help
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", sorted(cli.COMMANDS) + sorted(cli._plugins()))
def test_every_command_has_help(command, capsys):
    code, out, err = _run(capsys, command, "--help")
    assert code == 0, err
    assert out.startswith(f"usage: scaletrain {command}"), out


def test_help_inside_a_command_goes_to_its_own_parser(capsys):
    code, out, _ = _run(capsys, "bench", "kernels", "--help")
    assert code == 0
    assert "usage: scaletrain bench kernels" in out


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["--model.dim", "0"], "model.dim: 0"),
        (["--model.n_heads", "0"], "model.n_heads: 0"),
        (["--train.lr", "inf"], "train.lr: 'inf'"),
        (["--train.lr", "nan"], "train.lr: 'nan'"),
        (["--train.beta1", "1.5"], "train.beta1: 1.5"),
        (["--train.eps", "0"], "train.eps: 0.0"),
        (["--parallel.tp", "7"], "parallel.tp: 7 does not divide model.n_heads=4"),
        (["--parallel.tp", "2", "--world-size", "3"], "does not divide the world size 3"),
    ],
    ids=["dim0", "heads0", "lr_inf", "lr_nan", "beta1", "eps0", "tp7", "world_size"],
)
def test_config_show_refuses_bad_values_in_one_line(overrides, names, capsys):
    code, out, err = _run(capsys, "config", "show", TINY, *overrides)
    assert code == 2
    assert err.count("\n") == 1 and names in err and "Traceback" not in err, err
    assert out == ""


def test_data_path_that_is_a_folder_is_named_as_a_folder(tmp_path, capsys):
    code, _, err = _run(capsys, "config", "show", TINY, "--data.path", str(tmp_path))
    assert code == 2
    assert f"data.path: {str(tmp_path)!r} is a folder" in err


def test_config_show_reports_the_world_size_it_checked(capsys):
    code, out, _ = _run(capsys, "config", "show", TINY, "--parallel.tp", "2", "--parallel.dp_shard", "2")
    assert code == 0
    assert "# checked for a world size of 4" in out


def test_export_of_a_missing_folder_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nope"
    code, _, err = _run(capsys, "export", str(missing), "--format", "hf")
    assert code == 2
    assert err == f"scaletrain export: error: {missing}: no such checkpoint folder\n"


@pytest.mark.parametrize(
    ("b", "names"),
    [
        ("--parallel.tp 7", "parallel.tp: 7 does not divide model.n_heads=4"),
        ("--train.warmup_steps 20", "train.warmup_steps: 20 must be in [0, train.steps=5]"),
    ],
    ids=["tp7", "warmup"],
)
def test_parity_checks_both_layouts_before_starting_anything(b, names, capsys, monkeypatch):
    import scaletrain.parity

    def no_run(*args, **kwargs):
        raise AssertionError("a layout started before both were checked")

    monkeypatch.setattr(scaletrain.parity, "run_layout", no_run)
    code, _, err = _run(capsys, "parity", TINY, "--a", "", "--b", b, "--train.steps", "5", "--train.warmup_steps", "2")
    assert code == 2
    assert names in err and err.count("\n") == 1, err


def test_config_show_checks_all_but_data_that_lives_elsewhere(tmp_path, capsys):
    """A cluster config whose data is not on this laptop is still shown and checked; training refuses it."""
    from scaletrain.config import MissingDataError, load_config
    from scaletrain.validate import validate_config

    missing = str(tmp_path / "corpus.bin")
    code, out, _ = _run(capsys, "config", "show", TINY, "--data.path", missing)
    assert code == 0
    assert f"all but the data, which is not on this machine: data.path: {missing!r} does not exist" in out
    with pytest.raises(MissingDataError):
        validate_config(load_config(TINY, ["--data.path", missing]), 1)
    # Other errors still fail even then: the data check runs last.
    code, _, err = _run(capsys, "config", "show", TINY, "--data.path", missing, "--parallel.tp", "7")
    assert code == 2 and "parallel.tp: 7" in err


def test_config_show_plans_each_pipeline_ranks_model_state(capsys):
    """Two pipeline ranks of a 4-way FSDP x 2-way pipeline: each holds about half the model, sharded 4 ways,
    at 16 bytes per parameter (fp32 weights and gradients, two AdamW moments)."""
    code, out, _ = _run(capsys, "config", "show", TINY, "--parallel.pp", "2", "--parallel.dp_shard", "4")
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("#   pp rank")]
    assert [line.split(":")[0] for line in lines] == ["#   pp rank 0", "#   pp rank 1"]
    parameters = next(line for line in out.splitlines() if line.startswith("#   parameters:"))
    total = int(parameters.split(":")[1].replace(",", ""))
    for line in lines:
        gib = float(line.split(": ")[1].split(" GiB")[0])
        state = gib * 2**30 - float(line.split("pipeline_buffers ")[1].rstrip(")")) * 2**30
        assert state == pytest.approx(16 * total / 2 / 4, rel=0.25)  # stages differ by an embedding or a head


def test_plan_prints_each_pipeline_ranks_memory_and_checks_the_limit(capsys):
    """The first stage holds more activations than the last under 1F1B (pp - rank microbatches in flight), and
    a limit between the two ranks' totals fails the plan (exit 1) naming the rank that does not fit."""
    layout = ["--parallel.pp", "2", "--parallel.dp_shard", "2"]
    code, out, _ = _run(capsys, "plan", TINY, *layout)
    assert code == 0
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("pp ")}
    header = next(line.split() for line in out.splitlines() if line.startswith("rank"))
    column = header.index("activations") + 1  # the rank cell is two words ("pp 0")
    totals = {rank: float(row[-1]) for rank, row in rows.items()}
    assert float(rows["0"][column]) > float(rows["1"][column]) > 0
    limit_mib = (totals["0"] + totals["1"]) / 2
    code, out, _ = _run(capsys, "plan", TINY, *layout, "--memory-limit-gb", str(limit_mib / 1024))
    assert code == 1 and "does not fit: pp rank 0 needs" in out and "pp rank 1 needs" not in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--memory-limit-gb", "0"], r"--memory-limit-gb: 0.0 is not allowed"),
        (["--engine.name", "fairscale"], r"engine\.name: the planner predicts the native engine and DeepSpeed, not"),
    ],
)
def test_plan_refuses_bad_input(args, message, capsys):
    code, _, err = _run(capsys, "plan", TINY, *args)
    assert code == 2 and re.search(message, err), err


def test_plan_refuses_a_recipe_that_trains_in_phases(capsys):
    gan = TINY.replace("gpt/configs/tiny.yaml", "gan/configs/dcgan-tiny.yaml")
    code, _, err = _run(capsys, "plan", gan)
    assert code == 2 and "recipe: 'gan' trains in phases" in err, err

"""Every launcher refuses a bad request before it starts or queues anything (fast, no processes)."""

from __future__ import annotations

import argparse

import pytest
from launch_common import TINY_CONFIG

from scaletrain.launchers import cli
from scaletrain.launchers.argv import split_overrides
from scaletrain.launchers.checks import CPUS_PER_GPU_RANK, LaunchError, check_launch, parse_endpoint, ranks_needed
from scaletrain.launchers.sbatch import render
from scaletrain.launchers.slurm_env import first_host, torch_env_from_slurm
from scaletrain.launchers.torchrun import TorchrunLaunch, build_command


def _error(launch: TorchrunLaunch) -> str:
    with pytest.raises(LaunchError) as info:
        launch.check()
    return str(info.value)


# --- torchrun argument checks, one per case ------------------------------------------------------
def test_nproc_not_a_multiple_of_the_fixed_degrees():
    message = _error(TorchrunLaunch(TINY_CONFIG, ["--parallel.tp", "2"], nproc_per_node=3))
    assert "world size 3" in message and "tp=2" in message and "multiple of 2" in message


def test_nproc_differs_from_explicit_degrees():
    message = _error(TorchrunLaunch(TINY_CONFIG, ["--parallel.dp_shard", "2", "--parallel.tp", "2"], nproc_per_node=2))
    assert "world size 2" in message and "= 4" in message and "exactly 4" in message


def test_nodes_count_in_the_world_size():
    # 2 nodes x 1 process cannot hold tp=4, though tp=4 on one node of 4 would be fine.
    launch = TorchrunLaunch(TINY_CONFIG, ["--parallel.tp", "4"], nnodes=2, nproc_per_node=1, rdzv_endpoint="h:1")
    assert "2 node(s) x 1 process(es) = world size 2" in _error(launch)


def test_nnodes_below_one():
    assert "--nodes/--nnodes: 0" in _error(TorchrunLaunch(TINY_CONFIG, nnodes=0))


def test_nproc_below_one():
    assert "--nproc-per-node: 0" in _error(TorchrunLaunch(TINY_CONFIG, nproc_per_node=0))


@pytest.mark.parametrize("endpoint", ["node001", "node001:", ":29500", "node001:port", "a b:1", "[::1]29500"])
def test_bad_endpoint_format(endpoint):
    assert "not a valid endpoint" in _error(TorchrunLaunch(TINY_CONFIG, nnodes=2, rdzv_endpoint=endpoint))


def test_endpoint_port_out_of_range():
    assert "port 70000 is outside 1..65535" in _error(TorchrunLaunch(TINY_CONFIG, nnodes=2, rdzv_endpoint="h:70000"))


def test_many_nodes_need_an_endpoint():
    assert "needs --rdzv-endpoint" in _error(TorchrunLaunch(TINY_CONFIG, nnodes=2))


def test_node_rank_outside_nnodes():
    assert "--node-rank: 2 is outside 0..1" in _error(
        TorchrunLaunch(TINY_CONFIG, nnodes=2, node_rank=2, rdzv_endpoint="h:1")
    )


def test_negative_max_restarts():
    assert "--max-restarts: -1" in _error(TorchrunLaunch(TINY_CONFIG, max_restarts=-1))


def test_config_file_missing(tmp_path):
    assert "config file not found" in _error(TorchrunLaunch(str(tmp_path / "nope.yaml")))


def test_unknown_override_is_a_config_error():
    assert "did you mean 'train.steps'" in _error(TorchrunLaunch(TINY_CONFIG, ["--train.stepz", "3"]))


def test_batch_not_divisible_by_data_parallel_degree():
    # The trainer's own cross-field check, run for the launch's world size before anything starts.
    message = _error(TorchrunLaunch(TINY_CONFIG, ["--train.global_batch_size", "3"], nproc_per_node=2))
    assert "global_batch_size: 3 is not divisible" in message


def test_a_valid_request_passes():
    cfg = check_launch(TINY_CONFIG, ["--parallel.tp", "2"], num_nodes=2, nproc_per_node=2)
    assert cfg.parallel.tp == 2


# --- the pieces behind the checks --------------------------------------------------------------
def test_dp_shard_minus_one_fills_the_rest():
    assert ranks_needed({"pp": 2, "dp_replicate": 1, "dp_shard": -1, "cp": 1, "tp": 4}) == (8, True)
    assert ranks_needed({"pp": 1, "dp_replicate": 2, "dp_shard": 3, "cp": 1, "tp": 1}) == (6, False)


def test_parse_endpoint_accepts_names_ips_and_ipv6():
    assert parse_endpoint("node-01.cluster:29500") == ("node-01.cluster", 29500)
    assert parse_endpoint("10.77.0.1:1") == ("10.77.0.1", 1)
    assert parse_endpoint("[fe80::1]:29500") == ("fe80::1", 29500)


def test_split_overrides_keeps_negative_values_and_equals_form():
    flags, overrides = split_overrides(["c.yaml", "--nodes", "2", "--parallel.dp_shard", "-1", "--train.lr=0.1"])
    assert flags == ["c.yaml", "--nodes", "2"]
    assert overrides == ["--parallel.dp_shard", "-1", "--train.lr=0.1"]


def test_static_and_c10d_commands():
    static = build_command(TorchrunLaunch(TINY_CONFIG, nnodes=2, node_rank=1, rdzv_endpoint="node001:29500"))
    assert static[static.index("--node-rank") + 1] == "1" and "--master-addr" in static and "--standalone" not in static
    single = build_command(TorchrunLaunch(TINY_CONFIG, ["--train.steps", "2"], nproc_per_node=2))
    assert "--standalone" in single and single[-3:] == [TINY_CONFIG, "--train.steps", "2"]
    c10d = build_command(TorchrunLaunch(TINY_CONFIG, nnodes=2, rdzv_endpoint="127.0.0.1:29511", rdzv_id="abc"))
    assert c10d[c10d.index("--rdzv-backend") + 1] == "c10d" and c10d[c10d.index("--rdzv-id") + 1] == "abc"
    assert c10d[c10d.index("--local-addr") + 1] == "127.0.0.1"  # the address that reaches the endpoint
    ipv6 = build_command(TorchrunLaunch(TINY_CONFIG, nnodes=2, rdzv_endpoint="[::1]:29511"))
    assert ipv6[ipv6.index("--rdzv-endpoint") + 1] == "[::1]:29511"


# --- Slurm environment and templates ------------------------------------------------------------
@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("gpu[003-004,010],cpu1", "gpu003"), ("node7", "node7"), ("a1,b2", "a1"), ("r[2-3]n[05-06]", "r2n05")],
)
def test_first_host_of_a_nodelist(nodelist, first):
    assert first_host(nodelist) == first


def test_torch_env_from_slurm():
    env = torch_env_from_slurm({
        "SLURM_JOB_ID": "12345", "SLURM_JOB_NODELIST": "n[01-02]", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "2(x2)",
    })
    assert env == {"MASTER_ADDR": "n01", "MASTER_PORT": str(20000 + 12345 % 20000), "RANK": "3", "WORLD_SIZE": "4",
                   "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "1"}


def test_torch_env_outside_slurm_is_an_error():
    with pytest.raises(LaunchError, match="SLURM_JOB_ID is not set"):
        torch_env_from_slurm({})


def test_template_fields_must_all_be_filled():
    assert render("a {{X}} b", {"X": "1"}) == "a 1 b"
    with pytest.raises(LaunchError, match="without a value"):
        render("{{X}} {{Y}}", {"X": "1"})


# --- the CLI hook: errors are exit code 2 with the reason, nothing launched ----------------------
@pytest.mark.parametrize("launcher", ["torchrun", "slurm", "sbatch", "ray"])
def test_cli_rejects_before_launching(launcher, capsys):
    code = cli.main([launcher, TINY_CONFIG, "--nodes", "1", "--nproc-per-node", "3", "--parallel.tp", "2"])
    assert code == 2
    assert "world size 3 is not a multiple" in capsys.readouterr().err


def test_cli_usage_error_is_exit_code_2(capsys):
    assert cli.main(["mpirun", TINY_CONFIG]) == 2
    assert isinstance(cli.build_parser(), argparse.ArgumentParser)


def test_sbatch_dry_run_renders_the_request(capsys, tmp_path):
    code = cli.main(["sbatch", TINY_CONFIG, "--nodes", "2", "--nproc-per-node", "4", "--gpus-per-node", "4",
                     "--partition", "gpu", "--dry-run", "--job.run_dir", str(tmp_path), "--train.steps", "70"])
    script = capsys.readouterr().out
    assert code == 0 and "{{" not in script
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu", "--nproc-per-node=4"):
        assert line in script
    assert "--train.steps 70" in script and f"--job.run_dir {tmp_path}" in script
    assert not (tmp_path / "gpt-tiny").exists()  # a dry run writes nothing


def _dry_run(capsys, tmp_path, *flags: str) -> str:
    code = cli.main(["sbatch", TINY_CONFIG, "--nodes", "2", "--nproc-per-node", "4", "--dry-run",
                     "--job.run_dir", str(tmp_path), *flags])
    script = capsys.readouterr().out
    assert code == 0
    # Reads like a hand-written script: no template fields, notes or dead conditionals left over.
    for leftover in ("{{", "##", "double-braced", "if ((", "\n\n\n"):
        assert leftover not in script, leftover
    return script


def test_sbatch_asks_for_gpus_and_their_cores_by_default(capsys, tmp_path):
    script = _dry_run(capsys, tmp_path)
    assert "#SBATCH --gpus-per-node=4" in script
    assert f"#SBATCH --cpus-per-task={4 * CPUS_PER_GPU_RANK}" in script
    assert f"srun --kill-on-bad-exit=1 --cpus-per-task={4 * CPUS_PER_GPU_RANK} " in script
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in script  # only with torchrun restarts


def test_sbatch_for_a_gloo_config_asks_for_cpu_ranks(capsys, tmp_path):
    script = _dry_run(capsys, tmp_path, "--parallel.backend", "gloo", "--max-restarts", "2")
    assert "--gpus-per-node" not in script and "#SBATCH --cpus-per-task=4" in script
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in script and "--max-restarts=2" in script


def test_slurm_launcher_fills_the_same_defaults():
    from scaletrain.launchers.slurm import SlurmLaunch

    gpu = SlurmLaunch(TINY_CONFIG, [], nproc_per_node=2)
    gpu.check()
    assert (gpu.gpus_per_node, gpu.cpus_per_task) == (2, CPUS_PER_GPU_RANK)
    cpu = SlurmLaunch(TINY_CONFIG, ["--parallel.backend", "gloo"], nproc_per_node=2)
    cpu.check()
    assert (cpu.gpus_per_node, cpu.cpus_per_task) == (0, 1)
    with pytest.raises(LaunchError, match="--gpus-per-node 3 with --nproc-per-node 2"):
        SlurmLaunch(TINY_CONFIG, [], nproc_per_node=2, gpus_per_node=3).check()


def test_torchrun_dry_run_prints_the_plan_and_warns_over_the_memory_limit(capsys):
    """The launch is not started; each pipeline rank's predicted memory is printed (scaletrain plan's numbers),
    with a warning for the rank over --memory-limit-gb. Here the limit sits between the two ranks' totals:
    stage 0 holds two microbatches' activations under 1F1B, stage 1 one."""
    from scaletrain.config import load_config
    from scaletrain.plan.ranks import plan_memory
    from scaletrain.validate import validate_config

    layout = ["--parallel.pp", "2", "--parallel.dp_shard", "2"]
    cfg = load_config(TINY_CONFIG, layout)
    first, last = plan_memory(cfg, validate_config(cfg, 4))
    limit = (first.total + last.total) / 2 / 2**30
    code = cli.main(["torchrun", TINY_CONFIG, "--nproc-per-node", "4", "--dry-run", "--memory-limit-gb", str(limit),
                     *layout])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0
    assert f"plan: pp rank 0 needs {first.total / 2**30:.3g} GiB" in err
    assert f"plan: pp rank 1 needs {last.total / 2**30:.3g} GiB" in err
    assert "warning: pp rank 0 is predicted" in err and "warning: pp rank 1" not in err

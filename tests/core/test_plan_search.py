"""`scaletrain plan CONFIG --gpus N`: the layout search and its step-time model.

The time model is checked against the formulas written out by hand for one layout; the search for what it
must do with its candidates: keep the trainer's reason for an invalid one, rank those that fit by tokens/s
per GPU, put those over the memory limit after them, and fail (exit 1) naming the smallest when none fits.
"""

from __future__ import annotations

import csv
import re
from dataclasses import replace

import pytest
from st_common import TINY

from scaletrain import cli
from scaletrain.config import load_config
from scaletrain.plan.search import model_state_floor
from scaletrain.plan.step_time import GPUS, ModelFacts, step_time
from scaletrain.validate import validate_config

# The bandwidth formulas are checked without the per-collective latency, which has a test of its own.
NO_LATENCY = {name: replace(gpu, intra_node_latency_us=0, inter_node_latency_us=0, base_latency_us=0)
              for name, gpu in GPUS.items()}  # fmt: skip
SMALL = ["--tp", "1,2", "--pp", "1", "--ac", "none,full", "--gpus-per-node", "2", "--mbs", "0"]


def _plan(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["plan", TINY, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_fsdp_time_is_the_gathers_and_the_scatter_at_the_links_bandwidth():
    """FSDP2 over 8 ranks of one node, bf16, no accumulation, resharded after forward: two bf16 all-gathers
    and one fp32 reduce-scatter of the parameters, 7/8 of each over NVLink; compute = FLOPs / (peak x eff)."""
    cfg = load_config(TINY, ["--parallel.dp_shard", "8", "--train.dtype", "bf16", "--train.global_batch_size", "16"])
    dims = validate_config(cfg, 8)
    facts = ModelFacts(flops_per_sample=6e9, parameters=1e9, trunk_elements_per_sample=0, blocks=0)
    t = step_time(cfg, dims, NO_LATENCY["h100"], 8, 0.5, facts)
    assert t.compute_s == pytest.approx(6e9 * 2 / (989.5e12 * 0.5))
    assert t.fsdp_s == pytest.approx((2 * 2e9 + 4e9) * 7 / 8 / 450e9)
    assert (t.replicate_s, t.tp_s, t.bubble) == (0, 0, 0)
    assert t.step_s == pytest.approx(t.compute_s + max(0.0, t.fsdp_s - t.compute_s))


def test_each_collective_pays_nccls_ring_latency():
    """FSDP2 over 16 ranks on two nodes of 8, 4 blocks + the root = 5 units, each gathered twice and scattered
    once: 15 collectives of 8.4 us + 14 NVLink steps x 3.4 us + 1 network step x 9.6 us. TP 2 inside a node:
    8 collectives per block, each 8.4 + 3.4 us. Bandwidth terms as in the tests above."""
    cfg = load_config(TINY, ["--parallel.dp_shard", "16", "--train.dtype", "bf16", "--train.global_batch_size", "16"])
    facts = ModelFacts(flops_per_sample=6e9, parameters=1e9, trunk_elements_per_sample=1000, blocks=4)
    t = step_time(cfg, validate_config(cfg, 16), GPUS["h100"], 8, 0.5, facts)
    bandwidth = (2 * 2e9 + 4e9) * 15 / 16 / 50e9
    assert t.fsdp_s == pytest.approx(bandwidth + 15 * (8.4 + 14 * 3.4 + 9.6) * 1e-6)
    cfg = load_config(TINY, ["--parallel.tp", "2", "--parallel.dp_shard", "1", "--train.global_batch_size", "4",
                             "--train.dtype", "bf16"])  # fmt: skip
    t = step_time(cfg, validate_config(cfg, 2), GPUS["h100"], 8, 0.5, facts)
    assert t.tp_s == pytest.approx(8 * 4 * (1000 * 2 * 4) / 2 / 450e9 + 8 * 4 * (8.4 + 3.4) * 1e-6)
    # The config's hop latencies reach the model (here: none across nodes).
    from scaletrain.plan.command import _cluster_gpu

    cfg = load_config(TINY, ["--cluster.inter_node_latency_us", "0", "--parallel.dp_shard", "16"])
    assert _cluster_gpu(cfg.cluster, {}).inter_node_latency_us == 0


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_zero_stages_are_timed_and_held_as_the_zero_paper_says(stage):
    """ZeRO over 8 ranks of a node, bf16, Ψ = 1e9 trainable parameters, 2 micro-batches: the bytes a rank
    holds and what it moves, by hand (latency zeroed)."""
    cfg = load_config(TINY, ["--engine.name", "deepspeed", "--engine.deepspeed.zero_stage", str(stage),
                             "--parallel.dp_shard", "8", "--train.dtype", "bf16", "--train.global_batch_size", "16",
                             "--train.micro_batch_size", "1"])  # fmt: skip
    dims = validate_config(cfg, 8)
    facts = ModelFacts(flops_per_sample=6e9, parameters=int(1e9), trunk_elements_per_sample=0, blocks=0,
                       trainable=int(1e9))  # fmt: skip
    t = step_time(cfg, dims, NO_LATENCY["h100"], 8, 0.5, facts)
    ring, link = 7 / 8, 450e9
    grads = weights = 2e9 * ring  # bf16
    overlapped, exposed = {0: (0, 2 * grads), 1: (0, grads + weights), 2: (2 * grads, weights),
                           3: (2 * (2 * weights + grads), 0)}[stage]  # fmt: skip
    assert t.fsdp_s == pytest.approx(overlapped / link) and t.replicate_s == pytest.approx(exposed / link)
    floor = model_state_floor(cfg, dims, facts)
    held = {0: 2 + 2 + 12, 1: 2 + 2 + 12 / 8, 2: 2 + 14 / 8, 3: 16 / 8}[stage] * 1e9
    assert floor == pytest.approx(held)


def test_search_ranks_zero_stages_beside_native_layouts(capsys):
    """--engines adds DeepSpeed's ZeRO stages over every GPU; each is validated (DeepSpeed's own checks),
    timed and sized like the native layouts, and ranked among them."""
    pytest.importorskip("deepspeed")
    code, out, _ = _plan(capsys, "--gpus", "2", *SMALL, "--engines", "native,zero2,zero3", "--size-all")
    assert code == 0, out
    rows = [line for line in out.splitlines() if "ac=" in line]
    assert any(line.strip().startswith("zero2 dp2 ac=none") for line in rows), out
    assert any(line.strip().startswith("zero3 dp2 ac=full") for line in rows), out
    assert any(line.strip().startswith("fsdp2 ac=none") for line in rows), out


def test_pipeline_bubble_and_tensor_parallel_traffic():
    """1F1B over 2 stages with 2 microbatches idles 1/3 of the time; TP moves 8 gathers/scatters of the trunk
    activation per block, (tp-1)/tp each."""
    cfg = load_config(TINY, ["--parallel.pp", "2", "--parallel.tp", "2", "--parallel.dp_shard", "1",
                             "--train.global_batch_size", "4", "--train.dtype", "bf16"])  # fmt: skip
    dims = validate_config(cfg, 4)
    facts = ModelFacts(flops_per_sample=1e9, parameters=1e6, trunk_elements_per_sample=1000, blocks=4)
    t = step_time(cfg, dims, NO_LATENCY["a100"], 8, 1.0, facts)
    assert t.bubble == pytest.approx(1 / 3)
    assert t.tp_s == pytest.approx(8 * (4 / 2) * (1000 * 2 * 4) * (1 / 2) / 300e9)
    assert t.step_s == pytest.approx((t.compute_s + t.tp_s) * 1.5)


def test_search_ranks_the_layouts_that_fit_and_keeps_why_the_others_do_not(capsys, tmp_path):
    table = tmp_path / "plan.csv"
    pictures = tmp_path / "png"
    code, out, _ = _plan(capsys, "--gpus", "4", *SMALL, "--csv", str(table), "--png", str(pictures),
                         "--train.global_batch_size", "2")  # fmt: skip
    assert code == 0, out
    for name in ("memory.png", "step_time.png"):
        assert (pictures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(table.open()))
    assert {r["layout"] for r in rows} == {"fsdp4 ac=none", "fsdp4 ac=full", "hsdp2x2 ac=none", "hsdp2x2 ac=full",
                                          "tp2 fsdp2 ac=none", "tp2 fsdp2 ac=full"}  # fmt: skip
    # A global batch of 2 cannot split over 4 data-parallel ranks: the trainer's own message.
    for row in rows:
        if row["layout"].startswith(("fsdp4", "hsdp2x2")):
            assert "train.global_batch_size: 2 is not divisible by the data-parallel degree 4" in row["rejected"]
    fits = [r for r in rows if not r["rejected"]]
    assert [r["layout"] for r in fits] and all(r["layout"].startswith("tp2") for r in fits)
    speeds = [float(r["tokens/s/GPU"].replace(",", "")) for r in fits]
    assert speeds == sorted(speeds, reverse=True)
    assert rows[: len(fits)] == fits  # the ones that fit come first
    assert re.search(r"6 layouts, 2 valid, 2 sized \(fastest first\), 2 fit", out) and "tp2 fsdp2" in out


def test_no_layout_under_the_limit_fails_naming_the_smallest(capsys):
    code, out, _ = _plan(capsys, "--gpus", "2", *SMALL, "--memory-limit-gb", "0.001")
    assert code == 1
    assert re.search(r"no layout fits 0\.001 GiB; the closest: [^:]*ac=\w+ needs (at least )?[\d.e-]+ GiB", out), out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "4", "--gpu", "tpu9"], r"--gpu: 'tpu9' is not in the table; use one of \['a100', 'h100', 'h200'\]"),
        (["--gpus", "4", "--cluster.gpu", "mi300"], r"cluster.gpu: 'mi300' is not in the table; .* or 'custom'"),
        (["--gpus", "4", "--cluster.gpu", "custom", "--cluster.peak_tflops", "400"],
         r"cluster.gpu: 'custom' needs cluster.peak_tflops and cluster.memory_gib > 0 \(got 400 and 0\)"),
        (["--gpus", "4", "--cluster.gpu", "custom", "--cluster.peak_tflops", "400", "--cluster.memory_gib", "48"],
         r"a custom GPU needs both links"),
        (["--gpus", "4", "--cluster.efficiency", "1.5"], r"cluster.efficiency: 1.5 is not allowed"),
        (["--gpus", "3", "--tp", "2", "--pp", "2"], r"--gpus: no tp x pp x cp \(x ep dividing the data-parallel "
                                                    r"ranks\) of the given degrees divides 3 GPUs"),
        (["--gpus", "4", "--ac", "some"], r"--ac: \['some'\] not allowed"),
        (["--gpus", "4", "--efficiency", "1.5"], r"--efficiency: 1.5 is not allowed"),
        (["--gpus", "0"], r"--gpus / --gpus-per-node: 0 / 8 are not allowed"),
        (["--gpus", "4", "--engines", "native,zero4"], r"--engines: \['zero4'\] not allowed; use some of"),
        (["--gpus", "4", "--cluster.inter_node_latency_us", "-1"], r"cluster.inter_node_latency_us: -1.0 is not "),
    ],
)
def test_bad_search_input_is_refused_before_any_simulation(args, message, capsys):
    code, _, err = _plan(capsys, *args)
    assert code == 2 and re.search(message, err), err


def test_pruned_search_ranks_the_same_layouts_first_as_sizing_every_one():
    """The search sizes fastest first and rejects, without simulating, a layout that needs at least as much
    as one already over the limit: its top rows must be those of sizing every layout, and each rejection it
    inferred must be over the limit when sized."""
    from scaletrain.plan.search import Cluster, layouts, search

    candidates = layouts(4, 2, [1, 2], [1], ["none", "full"], [1], [1, 2])
    simulated = search(TINY, [], candidates, Cluster(4, GPUS["h100"], 2, 0.5, 80), None)
    sizes = sorted(r.memory_bytes for r in simulated)
    # Two fit: ac=none never does (its least needy layout, tp2 fsdp2 at one sample, is the 3rd smallest), so
    # the search can reject it wherever the least needy was sized.
    limit = (sizes[1] + sizes[2]) / 2 / 2**30
    every = search(TINY, [], candidates, Cluster(4, GPUS["h100"], 2, 0.5, limit), None)
    pruned = search(TINY, [], candidates, Cluster(4, GPUS["h100"], 2, 0.5, limit), 2)
    assert [r.layout for r in pruned[:2]] == [r.layout for r in every[:2]]
    assert all(not r.rejected for r in pruned[:2])
    inferred = [r.layout for r in pruned if r.rejected.startswith("needs more than")]
    assert inferred, "the limit leaves layouts whose rejection can be inferred"
    over = {r.layout for r in simulated if r.memory_bytes > limit * 2**30}
    assert set(inferred) <= over
    assert sum(bool(r.memory_bytes) for r in pruned) < len(simulated)


def test_simulations_in_two_processes_give_the_same_prediction():
    from scaletrain.plan.ranks import plan_memory

    cfg = load_config(TINY, ["--parallel.pp", "2", "--parallel.dp_shard", "2", "--model.n_layers", "16"])
    dims = validate_config(cfg, 4)
    assert plan_memory(cfg, dims, jobs=2) == plan_memory(cfg, dims, jobs=1)


@pytest.mark.parametrize(
    ("layout", "world"),
    [(["--parallel.dp_shard", "4"], 4), (["--parallel.tp", "2", "--parallel.dp_shard", "2"], 4),
     (["--parallel.pp", "2", "--parallel.dp_shard", "2"], 4), (["--parallel.dp_replicate", "2"], 2),
     (["--parallel.dp_shard", "2", "--train.ema_decay", "0.999"], 2)],
)  # fmt: skip
def test_model_state_floor_is_never_above_the_simulated_state(layout, world):
    """The search rejects a layout whose model-state floor exceeds the limit without simulating it: the floor
    must not exceed what the simulation finds on the fullest rank, and be close to it (within 25 %)."""
    from scaletrain.plan.ranks import plan_memory
    from scaletrain.plan.search import model_facts, model_state_floor

    cfg = load_config(TINY, layout)
    dims = validate_config(cfg, world)
    floor = model_state_floor(cfg, dims, model_facts(cfg))
    fullest = max(r.state.total for r in plan_memory(cfg, dims))
    assert 0.75 * fullest <= floor <= fullest, (floor, fullest)


def test_layouts_add_schedules_only_to_pipelines_and_expert_parallel_only_where_it_divides():
    from scaletrain.plan.search import layouts

    found = layouts(8, 8, [1], [1, 2], ["full"], [1], [0], [1, 4], ["1f1b", "interleaved_1f1b"], [0, 4])
    names = sorted(f.name for f in found)
    assert "fsdp8 ac=full" in names and "fsdp8 ep4 ac=full" in names  # pp = 1: no schedule
    assert "pp2(interleaved_1f1b/m4) fsdp4 ep4 ac=full" in names and "pp2(1f1b) fsdp4 ac=full" in names
    assert len(names) == 2 * 1 + 2 * 2 * 2  # pp1: ep 1,4; pp2: ep 1,4 x 2 schedules x 2 counts
    assert not layouts(8, 8, [2], [2], ["full"], [1], [0], [4])  # dp_shard 2 cannot lend 4 expert ranks
    interleaved = next(f for f in found if f.schedule == "interleaved_1f1b" and f.microbatches == 4)
    assert interleaved.overrides[-6:] == ["--parallel.pp_schedule", "interleaved_1f1b", "--parallel.stages_per_rank",
                                          "2", "--parallel.microbatches", "4"]  # fmt: skip


def test_expert_parallel_all_to_alls_are_four_per_routed_block():
    """Dispatch and combine, forward and backward, of top_k copies of each token's activation, (ep-1)/ep each,
    over NVLink when ep x tp fits a node."""
    cfg = load_config(TINY, ["--parallel.dp_shard", "4", "--parallel.ep", "2", "--train.global_batch_size", "8",
                             "--train.dtype", "bf16", "--model.moe.num_experts", "4"])  # fmt: skip
    dims = validate_config(cfg, 4)
    facts = ModelFacts(1e9, 1e6, trunk_elements_per_sample=1000, blocks=4, expert_blocks=3, top_k=2)
    t = step_time(cfg, dims, NO_LATENCY["h100"], 8, 0.5, facts)
    assert t.ep_s == pytest.approx(4 * 3 * (1000 * 2 * 2 * 2) * (1 / 2) / 450e9)
    assert t.step_s == pytest.approx(t.compute_s + t.exposed_fsdp_s + t.ep_s)


def test_search_over_pipeline_schedules_and_microbatch_counts(capsys):
    code, out, _ = _plan(capsys, "--gpus", "2", "--tp", "1", "--pp", "2", "--ac", "none", "--mbs", "0",
                         "--pp-schedule", "1f1b,interleaved_1f1b", "--microbatches", "2,4")  # fmt: skip
    assert code == 0, out
    for name in ("pp2(1f1b/m2)", "pp2(1f1b/m4)", "pp2(interleaved_1f1b/m2)", "pp2(interleaved_1f1b/m4)"):
        assert name in out, out
    bubbles = {m.group(1): float(m.group(2)) for m in re.finditer(r"(pp2\(\S+\)) fsdp1 ac=none .*?(0\.\d\d)  ", out)}
    assert bubbles["pp2(1f1b/m4)"] < bubbles["pp2(1f1b/m2)"]  # (pp-1) / (m x v + pp - 1)
    assert bubbles["pp2(interleaved_1f1b/m2)"] < bubbles["pp2(1f1b/m2)"]


def test_the_config_cluster_section_sets_the_gpu_links_and_efficiency(capsys):
    """`cluster:` in the config (or --cluster.* overrides) describes the machines; the flags win over it."""
    custom = ["--cluster.gpu", "custom", "--cluster.peak_tflops", "400", "--cluster.memory_gib", "48",
              "--cluster.intra_node_gbs", "100", "--cluster.inter_node_gbs", "25", "--cluster.gpus_per_node", "2",
              "--cluster.efficiency", "0.25", "--cluster.intra_node_latency_us", "0",
              "--cluster.inter_node_latency_us", "0"]  # fmt: skip
    code, out, _ = _plan(capsys, "--gpus", "4", *SMALL, *custom)
    assert code == 0, out
    assert "# 4 x custom (2 per node), limit 48 GiB, efficiency 0.25" in out
    code, out, _ = _plan(capsys, "--gpus", "4", *SMALL, *custom, "--gpu", "a100", "--efficiency", "0.5")
    assert code == 0 and "# 4 x A100" in out and "efficiency 0.5" in out, out
    cfg = load_config(TINY, ["--parallel.dp_shard", "4", "--train.dtype", "bf16", *custom])
    facts = ModelFacts(flops_per_sample=6e9, parameters=1e9, trunk_elements_per_sample=0, blocks=0)
    from scaletrain.plan.command import _cluster_gpu

    t = step_time(cfg, validate_config(cfg, 4), _cluster_gpu(cfg.cluster, {}), 2, 0.25, facts)
    assert t.compute_s == pytest.approx(6e9 * (16 / 4) / (400e12 * 0.25))  # 16 samples over 4 ranks
    # 4 ranks over 2 nodes: the NIC; the hops' latency set to 0, NCCL's 8.4 us base per collective remains.
    assert t.fsdp_s == pytest.approx((2 * 2e9 + 4e9) * 3 / 4 / 25e9 + 3 * 8.4e-6)

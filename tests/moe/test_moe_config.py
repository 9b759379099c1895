"""MoE configs: bad ones fail before any process starts, naming the field; `config show` counts active
parameters."""

from __future__ import annotations

import pytest
from st_common import REPO

from scaletrain import cli
from scaletrain.config import load_config
from scaletrain.recipes.gpt.hf import hf_architecture
from scaletrain.validate import validate_config

CONFIG = str(REPO / "scaletrain" / "recipes" / "gpt" / "configs" / "tiny-moe.yaml")
DIT = str(REPO / "scaletrain" / "recipes" / "diffusion" / "configs" / "dit-tiny.yaml")


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["--model.moe.top_k", "9"], 1, r"model\.moe\.top_k: 9 must be in \[1, num_experts=8\]"),
        (["--model.moe.capacity_factor", "-1"], 1, r"model\.moe\.capacity_factor: -1\.0 is not allowed"),
        (["--model.moe.num_shared_experts", "-1"], 1, r"model\.moe\.num_shared_experts: -1 is not allowed"),
        (["--model.moe.first_dense", "4"], 1, r"model\.moe\.first_dense: 4 leaves no MoE block in 4 layers"),
        (["--model.moe.groups", "3", "--model.moe.topk_groups", "1"], 1, r"model\.moe\.groups: 3 does not divide"),
        (["--model.moe.groups", "4", "--model.moe.topk_groups", "1", "--model.moe.top_k", "3"], 1,
         r"model\.moe\.top_k: 3 is more than the 1 kept groups hold \(2 experts\)"),
        (["--model.mlp", "gelu"], 1, r"model\.mlp: the experts are SwiGLU MLPs"),
        (["--parallel.pp", "2", "--parallel.dp_shard", "1"], 2, r"model\.moe\.aux_loss_coef: the balancing losses"),
        (["--model.moe.aux_loss_scope", "batch"], 1, r"model\.moe\.aux_loss_scope: 'batch' is not allowed"),
        (["--parallel.dp_shard", "6", "--parallel.ep", "3", "--train.global_batch_size", "12"], 6,
         r"parallel\.ep: 3 does not divide model\.moe\.num_experts=8; .* \(allowed: 1, 2, 4, 8\)"),
        (["--parallel.dp_shard", "2", "--parallel.ep", "4"], 2,
         r"parallel\.ep: 4 must be >= 1 and divide dp_shard x cp = 2 x 1 = 2 .* allowed: 1, 2"),
        (["--parallel.dp_shard", "2", "--parallel.ep", "2", "--model.moe.num_experts", "0"], 2,
         r"parallel\.ep: 2 needs routed experts to split, and model\.moe\.num_experts is 0"),
        (["--parallel.dp_shard", "2", "--parallel.ep", "2", "--engine.name", "deepspeed"], 2,
         r"parallel\.ep: expert parallel runs on the native engine only"),
        (["--parallel.ep", "0"], 1, r"parallel\.ep: 0 must be >= 1"),
    ],
    ids=["top_k", "capacity", "shared", "first_dense", "groups", "top_k_groups", "gelu", "pp_aux", "scope",
         "ep_experts", "ep_dp_shard_cp", "ep_dense", "ep_engine", "ep_zero"],
)  # fmt: skip
def test_bad_moe_configs_fail_before_any_process_starts(overrides, world, message):
    with pytest.raises(ValueError, match=message):
        validate_config(load_config(CONFIG, overrides), world)


def test_moe_options_on_a_family_without_moe_are_unknown_keys():
    with pytest.raises(ValueError, match=r"model\.moe: unknown key"):
        load_config(DIT, ["--model.moe.num_experts", "4"])


def test_expert_parallel_on_a_family_without_experts_is_refused():
    with pytest.raises(ValueError, match=r"parallel\.ep: recipe 'dit' has no routed experts to split"):
        validate_config(load_config(DIT, ["--parallel.dp_shard", "2", "--parallel.ep", "2"]), 2)


def test_pipeline_with_bias_balancing_only_is_allowed():
    cfg = load_config(CONFIG, ["--parallel.pp", "2", "--parallel.dp_shard", "1", "--model.moe.aux_loss_coef", "0",
                               "--model.moe.bias_update_rate", "0.001"])  # fmt: skip
    validate_config(cfg, 2)


def test_config_show_counts_active_parameters(capsys):
    assert cli.main(["config", "show", CONFIG]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = dict(line.strip("# ").split(": ") for line in out if line.startswith("#   "))
    total, active = (int(lines[k].replace(",", "")) for k in ("parameters", "active_parameters"))
    per_expert = 3 * 128 * 128  # w1, w3: dim x expert_hidden; w2 back
    assert total - active == 3 * (8 - 2) * per_expert  # 3 MoE blocks (first_dense 1 of 4), 6 unused experts each


def _summary(config: str, capsys) -> dict[str, int]:
    assert cli.main(["config", "show", config, "--world-size", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = dict(line.strip("# ").split(": ", 1) for line in out if line.startswith("#   "))
    # The model's counts; the per-rank model-state lines that follow ("every rank: 87 GiB (...)") are not.
    return {k: int(float(v.replace(",", ""))) for k, v in rows.items() if "GiB" not in v}


def test_mixtral_config_has_mixtrals_published_size(capsys):
    counts = _summary(str(REPO / "scaletrain/recipes/gpt/configs/mixtral-8x7b.yaml"), capsys)
    assert counts["parameters"] == 46_702_792_704  # Mixtral-8x7B's safetensors hold 46,702,792,704
    assert counts["active_parameters"] == 12_879_925_248  # "12.9B active": 2 of 8 experts per block


def test_qwen3_moe_config_has_its_published_size(capsys):
    counts = _summary(str(REPO / "scaletrain/recipes/gpt/configs/qwen3-moe-30b-a3b.yaml"), capsys)
    # Qwen3-30B-A3B: "30.5B in total and 3.3B activated" (its model card); 48 blocks of 128 experts, top-8.
    assert round(counts["parameters"] / 1e9, 1) == 30.5
    assert 3.3e9 <= counts["active_parameters"] < 3.4e9  # 3,353,032,704 (all weights but 120 idle experts a block)


def test_hf_export_names_what_mixtral_and_qwen3_moe_cannot_express():
    cfg = load_config(CONFIG, [])  # tiny-moe: a shared expert and a dense first block
    with pytest.raises(ValueError, match=r"as Mixtral .*model\.moe\.num_shared_experts: 1 .*model\.moe\.first_dense"):
        hf_architecture(cfg.model)
    cfg = load_config(CONFIG, ["--model.qk_norm", "true", "--model.moe.score", "sigmoid"])
    with pytest.raises(ValueError, match=r"as Qwen3-MoE cannot express: .*shared.*model\.moe\.score: sigmoid"):
        hf_architecture(cfg.model)
    cfg = load_config(CONFIG, ["--model.qk_norm", "true", "--model.moe.num_shared_experts", "0"])
    assert hf_architecture(cfg.model) == "qwen3_moe"


def test_deepseek_sized_config_validates_and_routes_a_few_percent(capsys):
    counts = _summary(str(REPO / "scaletrain/recipes/gpt/configs/deepseek-v3-sized.yaml"), capsys)
    # GQA instead of multi-head latent attention, no multi-token prediction: near, not equal to, 671B / 37B.
    assert 600e9 < counts["parameters"] < 700e9 and 30e9 < counts["active_parameters"] < 40e9

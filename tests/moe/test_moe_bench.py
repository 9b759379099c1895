"""`scaletrain bench` on an MoE config compares it with the dense model of the same active size."""

from __future__ import annotations

from st_common import REPO

from scaletrain.bench import bench
from scaletrain.config import load_config
from scaletrain.recipes.gpt.bench_baselines import bench_baselines, dense_of_active_size
from scaletrain.recipes.gpt.moe import active_parameters
from scaletrain.registry import get_recipe

CONFIG = str(REPO / "scaletrain" / "recipes" / "gpt" / "configs" / "tiny-moe.yaml")
DENSE = "independent plain llama, dense of the same active size"


def test_dense_baseline_holds_the_weights_a_token_uses():
    cfg = load_config(CONFIG, ["--model.moe.num_shared_experts", "0"])  # tiny-moe without its shared expert
    moe_model = get_recipe("gpt").model.build(cfg.model)
    dense = bench_baselines(cfg)[DENSE]()
    m = cfg.model
    routers = sum(m.moe.is_moe_block(i) for i in range(m.n_layers)) * m.dim * m.moe.num_experts
    # tiny-moe's dense first block has the automatic width 384; the dense model's are 2 x 128 = 256 wide.
    first_block_gap = 3 * m.dim * (m.hidden_dim - dense_of_active_size(m).ffn_hidden)
    dense_params = sum(p.numel() for p in dense.parameters())
    assert dense_params == active_parameters(moe_model, cfg) - routers - first_block_gap


def test_bench_reports_the_moe_model_beside_the_dense_one(tmp_path):
    overrides = ["--data.seq_len", "32", "--train.global_batch_size", "4", "--model.n_layers", "2",
                 "--train.steps", "4", "--train.warmup_steps", "1", "--job.run_dir", str(tmp_path),
                 "--metrics.tensorboard", "false", "--checkpoint.enable", "false"]  # fmt: skip
    result = bench(load_config(CONFIG, overrides), steps=2, warmup=1, rounds=1)
    assert set(result.baselines) == {"plain loop, scaletrain's model", DENSE}
    assert result.ratio(DENSE) > 0 and DENSE in result.report()

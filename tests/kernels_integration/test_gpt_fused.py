"""A tiny GPT with every fused kernel on trains like the unfused model.

Fused = --model.attention triton --model.fused_norm/fused_rope/fused_swiglu true --train.fused_cross_entropy
true, against the default (sdpa, torch norms/rope/silu, full-logits cross-entropy), both fp32 from the same
layout-independent init and the same batches. Tolerances: loss 1e-5 relative, grad norm 1e-4 relative, every
step (observed <= 1e-7 on both: the kernels do the same fp32 math in another order). On CPU the kernels run in
the Triton interpreter (~4 s per step here, hence the small shapes).

Under tensor parallel (2 processes; FSDP2 x TP, 4 processes, with -m slow) the norms see sequence-sharded
DTensors and run the fused kernel through its DTensor sharding rule, and fused cross-entropy runs over each
rank's vocabulary shard of the head. Same tolerances; observed <= 1.7e-7 on both. Under pipeline parallel
(ZBV, 2 processes; pp2 x tp2, 4 processes, -m slow) the last stage computes the fused loss in its forward;
observed <= 1.7e-7.

The in-process test also records which ``scaletrain_kernels`` ops ran, so a flag that stops reaching its
kernel fails instead of comparing the reference with itself.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch
from ki_common import KernelOps
from st_common import TINY

from scaletrain import ops
from scaletrain.parity import compare, run_layout
from scaletrain.recipes.gpt import loss as gpt_loss
from scaletrain.recipes.gpt import model_inputs
from scaletrain.recipes.gpt.model import GPT, GPTConfig

SMALL = [
    "--model.n_layers", "2", "--model.dim", "64", "--data.seq_len", "16",
    "--train.global_batch_size", "2", "--train.steps", "4", "--train.warmup_steps", "2",
]  # fmt: skip
FUSED = [
    "--model.attention", "triton", "--model.fused_norm", "true", "--model.fused_rope", "true",
    "--model.fused_swiglu", "true", "--train.fused_cross_entropy", "true",
]  # fmt: skip
LOSS_RTOL = 1e-5
GNORM_RTOL = 1e-4
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _triton_runs() -> None:
    if ops.fused_backend(torch.empty(0, device=DEVICE)) == "torch-fallback":
        pytest.skip("the Triton path cannot run here (no triton, or kernels imported before TRITON_INTERPRET=1)")


def _model(fused: bool, **overrides) -> GPT:  # noqa: ANN003
    cfg = GPTConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, **overrides)
    if fused:
        cfg.attention, cfg.fused_norm, cfg.fused_rope, cfg.fused_swiglu = "triton", True, True, True
    model = GPT(cfg).to(DEVICE)
    model.fused_cross_entropy = fused
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        model.init_tensor(name, tensor, torch.Generator(device=DEVICE).manual_seed(zlib.crc32(name.encode())))
    return model


def test_fused_gpt_runs_every_kernel_and_matches():
    torch.manual_seed(0)
    plain, fused = _model(False), _model(True)
    fused.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(1)
    batch = {k: torch.randint(0, 96, (2, 13), generator=g).to(DEVICE) for k in ("input", "target")}
    with KernelOps() as seen:
        out = fused(*model_inputs(batch))
        assert out.dim() == 0, "with fused cross-entropy the model returns the loss, not logits"
        loss_fused = gpt_loss(out, batch)
        loss_fused.backward()
    assert {"attention_fwd", "attention_bwd", "rms_norm_fwd", "rms_norm_bwd", "rope_", "swiglu_fwd",
            "swiglu_bwd", "cross_entropy_chunk_"} <= seen.names, seen.names  # fmt: skip
    logits = plain(*model_inputs(batch))
    assert logits.shape == (2, 13, 96)
    loss_plain = gpt_loss(logits, batch)
    loss_plain.backward()
    torch.testing.assert_close(loss_fused, loss_plain, atol=0, rtol=LOSS_RTOL)
    grads = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_rmsnorm_module_keeps_nn_rmsnorm_state():
    ours = _model(True).layers["0"].attention_norm
    theirs = torch.nn.RMSNorm(64, eps=1e-5)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(3, 64, device=DEVICE)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.to(DEVICE).weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-5)


def test_tied_embeddings_use_the_embedding_as_head():
    plain, fused = _model(False, tie_embeddings=True), _model(True, tie_embeddings=True)
    fused.load_state_dict(plain.state_dict())
    batch = {k: torch.randint(0, 96, (2, 8), device=DEVICE) for k in ("input", "target")}
    torch.testing.assert_close(
        fused(*model_inputs(batch)), gpt_loss(plain(*model_inputs(batch)), batch), atol=0, rtol=LOSS_RTOL
    )


@pytest.fixture(scope="module")
def unfused_run(tmp_path_factory):
    return run_layout(TINY, SMALL, tmp_path_factory.mktemp("unfused"), "unfused", nproc=1)


def _assert_close(base: list[dict], rows: list[dict]) -> None:
    report = compare(base, rows)
    assert len(report.steps) == 4
    assert report.max_loss_rel_diff <= LOSS_RTOL, report.table()
    assert report.max_grad_norm_rel_diff <= GNORM_RTOL, report.table()
    assert report.loss_b[-1] < report.loss_b[0], "the fused model did not learn"


def test_training_with_all_fused_kernels_matches_unfused(unfused_run, tmp_path):  # noqa: ANN001
    _assert_close(unfused_run, run_layout(TINY, SMALL + FUSED, tmp_path, "fused", nproc=1))


def test_fused_training_under_fsdp2_matches_unfused(unfused_run, tmp_path):  # noqa: ANN001
    # FSDP2 unshards the output weight only inside the model's forward: the fused loss is computed there.
    rows = run_layout(TINY, SMALL + FUSED + ["--parallel.dp_shard", "2"], tmp_path, "fused_fsdp2", nproc=2)
    _assert_close(unfused_run, rows)


def test_fused_training_under_tensor_parallel_matches_unfused(unfused_run, tmp_path):  # noqa: ANN001
    # Sequence parallel hands the norms DTensors sharded over the sequence: the fused RMSNorm runs on them
    # through its sharding rule (scaletrain/kernels/sharding.py), its weight gradient a partial sum over the tp ranks.
    # RoPE, SwiGLU and attention see each rank's local heads / hidden units. Fused cross-entropy runs on
    # each rank's vocabulary shard of the head and all-gathers two floats per row.
    tp = ["--parallel.tp", "2", "--parallel.dp_shard", "1"]
    rows = run_layout(TINY, SMALL + FUSED + tp, tmp_path, "fused_tp2", nproc=2)
    _assert_close(unfused_run, rows)


@pytest.mark.slow
def test_fused_training_under_fsdp2_x_tensor_parallel_matches_unfused(unfused_run, tmp_path):  # noqa: ANN001
    # 4 processes: FSDP2 all-gathers the tp-sharded weights; the norms still see sequence-sharded DTensors.
    layout = ["--parallel.tp", "2", "--parallel.dp_shard", "2"]
    rows = run_layout(TINY, SMALL + FUSED + layout, tmp_path, "fused_fsdp2_tp2", nproc=4)
    _assert_close(unfused_run, rows)


def test_fused_cross_entropy_under_pipeline_parallel_matches_unfused(tmp_path):  # noqa: ANN001
    # ZBV puts the first and the last stage on rank 0: the targets reach the last stage as a forward keyword
    # (PipelineSpec.target_kwarg), not positionally through the first stage, and the last stage returns the
    # loss. Fused cross-entropy only (the interpreter makes every fused kernel slow on CPU).
    four_layers = [*SMALL, "--model.n_layers", "4"]
    base = run_layout(TINY, four_layers, tmp_path, "unfused_l4", nproc=1)
    pp = ["--parallel.pp", "2", "--parallel.pp_schedule", "zbv", "--parallel.stages_per_rank", "2"]
    rows = run_layout(TINY, four_layers + FUSED[-2:] + pp, tmp_path, "fused_ce_zbv", nproc=2)
    _assert_close(base, rows)


@pytest.mark.slow
def test_fused_cross_entropy_under_pipeline_x_tensor_parallel_matches_unfused(unfused_run, tmp_path):  # noqa: ANN001
    # 4 processes: the last stage's head is vocabulary-sharded, so the loss is the vocabulary-parallel kernel.
    layout = ["--parallel.pp", "2", "--parallel.tp", "2", "--parallel.dp_shard", "1"]
    _assert_close(unfused_run, run_layout(TINY, SMALL + FUSED[-2:] + layout, tmp_path, "fused_ce_pp2_tp2", nproc=4))

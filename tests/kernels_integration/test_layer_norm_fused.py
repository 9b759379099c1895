"""model.fused_norm with LayerNorm: a GPT-2-style GPT (norm=layernorm, learned positions, GELU, biases) and a DiT
(adaLN-Zero: LayerNorm without affine + modulate) train the same with the fused scaletrain/kernels/layer_norm.py kernel
as
without it.

Both models are built from the recipes' configs (the GPT from scaletrain/recipes/gpt/configs/tiny.yaml, the DiT from
scaletrain/recipes/diffusion/configs/dit-tiny.yaml, shrunk), initialized by name (layout-independent, so fused and
unfused
start from the same weights), and trained 4 AdamW steps in this process on the same fixed batches, fp32; the
DiT's parameters are perturbed first so the adaLN shift / scale are not zero from the start. Tolerances, per
step: loss 1e-5 relative, and at step 0 every parameter gradient atol 1e-5 / rtol 1e-4 (the kernels do the same
fp32 math in another order). Observed (printed with -s): loss 9.8e-8 relative (GPT-2), 1.1e-7 (DiT). The fused
runs must dispatch the ``scaletrain_kernels`` layer_norm ops and the unfused ones must not, so a flag that stops
reaching its kernel fails instead of comparing torch with itself. On CPU the kernels run in the Triton interpreter.

With -m slow: the same through the trainer (torchrun, scaletrain.parity's harness; loss 1e-5, grad norm 1e-4
relative), including GPT-2 under tensor parallel 2, where the sequence-parallel LayerNorms get sequence-sharded
DTensors and run the kernel through its DTensor sharding rule (weight / bias gradients Partial). Observed: GPT-2
one process loss 1.9e-7 / grad norm 1.1e-6, tp2 2.7e-7 / 1.3e-6; the DiT's runs agree bit for bit (from the
adaLN-Zero init, 4 steps move the output too little for the norms' last-bit differences to reach the loss — the
in-process DiT test above perturbs the weights for that reason).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ki_common import KernelOps
from st_common import TINY

from scaletrain import ops
from scaletrain.config import load_config
from scaletrain.parallel import init_model
from scaletrain.parity import compare, run_layout
from scaletrain.recipes.diffusion.dit import DiT, modulate
from scaletrain.recipes.diffusion.parallelize import resolve_attention, startup_notes
from scaletrain.recipes.gpt import hf, model_inputs
from scaletrain.recipes.gpt import loss as gpt_loss
from scaletrain.recipes.gpt.model import GPT, LayerNorm
from scaletrain.validate import validate_config

CONFIGS = Path(__file__).resolve().parents[2] / "scaletrain" / "recipes" / "diffusion" / "configs"
DIT_TINY = str(CONFIGS / "dit-tiny.yaml")
GPT2 = ["--model.norm", "layernorm", "--model.pos", "learned", "--model.mlp", "gelu", "--model.bias", "true"]
GPT_SMALL = ["--model.n_layers", "2", "--model.dim", "64", "--data.seq_len", "16", "--train.global_batch_size", "2"]
DIT_SMALL = ["--model.image_size", "16", "--model.patch_size", "4", "--model.dim", "64", "--model.depth", "2",
             "--model.n_heads", "4"]  # fmt: skip
FUSED = ["--model.fused_norm", "true"]
LOSS_RTOL = 1e-5
LN_OPS = {"layer_norm_fwd", "layer_norm_bwd"}
STEPS = 4


@pytest.fixture(autouse=True)
def _triton_runs() -> None:
    if ops.fused_backend(torch.empty(0)) == "torch-fallback":
        pytest.skip("the Triton path cannot run here (no triton, or kernels imported before TRITON_INTERPRET=1)")


def _gpt(fused: bool, extra: tuple[str, ...] = ()) -> GPT:
    cfg = load_config(TINY, GPT2 + GPT_SMALL + list(extra) + (FUSED if fused else []))
    return init_model(GPT(cfg.model), "cpu", seed=0)


def _dit(fused: bool) -> DiT:
    cfg = load_config(DIT_TINY, DIT_SMALL + (FUSED if fused else []))
    model = init_model(DiT(cfg.model), "cpu", seed=0)
    with torch.no_grad():  # adaLN-Zero starts every shift / scale / gate at 0: give them values
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


# One batch, trained on STEPS times: the loss must fall (memorization), which shows the gradients are useful.
def _gpt_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [{k: torch.randint(0, 256, (2, 16), generator=g) for k in ("input", "target")}] * STEPS


def _dit_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    batch = {"x_t": torch.randn(4, 3, 16, 16, generator=g), "t": torch.randint(0, 1000, (4,), generator=g).float(),
             "y": torch.randint(0, 6, (4,), generator=g), "target": torch.randn(4, 3, 16, 16, generator=g)}  # fmt: skip
    return [batch] * STEPS


def _train(model: torch.nn.Module, batches: list[dict], step_loss) -> tuple[list[float], dict, set[str]]:  # noqa: ANN001
    """STEPS AdamW steps; returns the losses, the step-0 gradients and the kernel ops dispatched."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses, first_grads = [], {}
    with KernelOps() as seen:
        for batch in batches:
            optimizer.zero_grad()
            loss = step_loss(model, batch)
            loss.backward()
            if not first_grads:
                first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            optimizer.step()
            losses.append(loss.item())
    return losses, first_grads, seen.names


def _check(name: str, plain: tuple, fused: tuple) -> None:
    (loss_a, grads_a, ops_a), (loss_b, grads_b, ops_b) = plain, fused
    assert LN_OPS <= ops_b, f"{name}: the fused model did not run the LayerNorm kernel ({ops_b})"
    assert not ops_a & LN_OPS, f"{name}: the unfused model ran the kernel ({ops_a})"
    rel = max(abs(a - b) / abs(a) for a, b in zip(loss_a, loss_b, strict=True))
    print(f"{name}: losses {loss_a} vs {loss_b}; max relative difference {rel:.2e}")
    assert rel <= LOSS_RTOL, (loss_a, loss_b)
    assert loss_b[-1] < loss_b[0], f"{name}: the fused model did not learn: {loss_b}"
    assert grads_a.keys() == grads_b.keys()
    for key, grad in grads_a.items():
        torch.testing.assert_close(grads_b[key], grad, atol=1e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")


def test_gpt2_layernorm_trains_the_same_fused():
    def step_loss(model: GPT, batch: dict) -> torch.Tensor:
        return gpt_loss(model(*model_inputs(batch)), batch)

    plain, fused = _gpt(False), _gpt(True)
    assert isinstance(fused.layers["0"].attention_norm, LayerNorm) and fused.norm.fused
    batches = _gpt_batches()
    _check("gpt2", _train(plain, batches, step_loss), _train(fused, batches, step_loss))


def test_dit_trains_the_same_fused():
    def step_loss(model: DiT, batch: dict) -> torch.Tensor:
        return F.mse_loss(model(batch["x_t"], batch["t"], batch["y"]), batch["target"])

    plain, fused = _dit(False), _dit(True)
    assert all(m.fused for m in fused.modules() if hasattr(m, "fused"))
    batches = _dit_batches()
    _check("dit", _train(plain, batches, step_loss), _train(fused, batches, step_loss))


@pytest.mark.parametrize("bias", [True, False])
def test_gpt_layernorm_module_keeps_nn_layernorm_state_and_hf_names(bias):  # noqa: ANN001
    """Same parameter names as nn.LayerNorm (bias optional), same output, and the GPT-2 export / import of a
    fused model is the unfused model's, tensor for tensor."""
    ours, theirs = LayerNorm(48, eps=1e-5, bias=bias, fused=True), torch.nn.LayerNorm(48, eps=1e-5, bias=bias)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(0.5, 1.5)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 48)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)

    flag = ("--model.bias", "true" if bias else "false")
    plain, fused = _gpt(False, flag), _gpt(True, flag)
    assert plain.state_dict().keys() == fused.state_dict().keys()
    exported = hf._gpt2_tensors(fused.cfg, fused.state_dict())
    want = hf._gpt2_tensors(plain.cfg, plain.state_dict())
    assert exported.keys() == want.keys() and all(torch.equal(exported[k], want[k]) for k in want)


def test_dit_norm_is_layernorm_then_modulate():
    """The unfused AdaLayerNorm is exactly what the DiT ran before (nn.LayerNorm without affine, then
    `modulate`); the fused one matches it within 1e-5."""
    plain, fused = _dit(False), _dit(True)
    x, shift, scale = torch.randn(2, 16, 64), torch.randn(2, 64), torch.randn(2, 64)
    before = modulate(torch.nn.LayerNorm(64, elementwise_affine=False, eps=1e-6)(x), shift, scale)
    assert torch.equal(plain.blocks["0"].norm1(x, shift, scale), before)
    torch.testing.assert_close(fused.blocks["0"].norm1(x, shift, scale), before, atol=1e-5, rtol=1e-5)
    assert plain.state_dict().keys() == fused.state_dict().keys()  # no parameters added


def test_dit_startup_line_reports_the_fused_norm():
    for fused, tail in ((False, ""), (True, " | fused: norm (triton-interpret)")):
        cfg = load_config(DIT_TINY, FUSED if fused else [])
        with torch.device("meta"):
            model = DiT(cfg.model)
        resolve_attention(model, cfg, tokens=64)
        assert startup_notes(model, cfg, validate_config(cfg, 1)) == [
            "kernels: attention auto -> sdpa (cpu: Triton kernels only run interpreted off CUDA)" + tail
        ]


def test_dit_accepts_fused_norm():
    # The U-Net and the VAE accept it too (GroupNorm + SiLU kernels): test_group_norm_fused.py.
    validate_config(load_config(DIT_TINY, FUSED), 1)


# -- through the trainer (torchrun) ---------------------------------------------------------------------------

TRAIN = ["--train.steps", "4", "--train.warmup_steps", "1"]
DIT_TRAIN = DIT_SMALL + TRAIN + ["--train.global_batch_size", "8", "--train.ema_decay", "0", "--eval.interval", "0",
                                 "--metrics.console", "false"]  # fmt: skip


def _assert_close(base: list[dict], rows: list[dict]) -> None:
    report = compare(base, rows)
    print(report.table())
    assert len(report.steps) == 4
    assert report.max_loss_rel_diff <= LOSS_RTOL, report.table()
    assert report.max_grad_norm_rel_diff <= 1e-4, report.table()


@pytest.mark.slow
def test_trainer_gpt2_fused_norm_one_process_and_tensor_parallel(tmp_path):  # noqa: ANN001
    small = GPT2 + GPT_SMALL + TRAIN
    base = run_layout(TINY, small, tmp_path, "unfused", nproc=1)
    _assert_close(base, run_layout(TINY, small + FUSED, tmp_path, "fused", nproc=1))
    tp = ["--parallel.tp", "2", "--parallel.dp_shard", "1"]
    _assert_close(base, run_layout(TINY, small + FUSED + tp, tmp_path, "fused_tp2", nproc=2))


@pytest.mark.slow
def test_trainer_dit_fused_norm(tmp_path):  # noqa: ANN001
    base = run_layout(DIT_TINY, DIT_TRAIN, tmp_path, "unfused", nproc=1)
    _assert_close(base, run_layout(DIT_TINY, DIT_TRAIN + FUSED, tmp_path, "fused", nproc=1))

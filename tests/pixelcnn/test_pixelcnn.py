"""The PixelCNN recipe: Gated PixelCNN with softmax or discretized-logistic-mixture output.

- Causality (float64, weights moved off their init): the dependency pattern of every sub-pixel's outputs on
  the input is exactly "everything before it in raster-then-channel order": zero gradient from itself and
  everything after, non-zero from everything before (the receptive field covers the whole 6x6 image).
- The blind spot: a pixel one row up and three columns right is reached once the vertical stack has grown
  wide enough (3 layers of kernel 3), while a plain stack of masked 3x3 convolutions (built here) never
  reaches it at any depth.
- Normalization: on 2x2x3 images at 1 bit, the probabilities of all 4096 images sum to 1 (both outputs).
- Parity (gloo, fp32, 5 steps, against one process, within 1e-5 relative: losses and grad norms): DDP over 2
  ranks, FSDP2 over 2 and gradient accumulation in one process (softmax); FSDP2 over 2 (mixture).
- Train -> eval (held-out bits/dim) -> `scaletrain sample` from the EMA weights, one class.
- Bad input before compute: even kernel sizes, n_bits out of range, more classes than the data has, class
  conditioning on an unlabelled folder.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from st_common import REPO
from torch import nn

from scaletrain.config import load_config
from scaletrain.parallel import init_model
from scaletrain.parity import compare, run_layout
from scaletrain.recipes.pixelcnn.model import PixelCNN, PixelCNNConfig, levels_to_image
from scaletrain.validate import validate_config

TINY = str(REPO / "scaletrain" / "recipes" / "pixelcnn" / "configs" / "pixelcnn-tiny.yaml")
SMALL = ["--model.image_size", "8", "--model.hidden", "12", "--model.n_layers", "2", "--model.first_kernel_size",
         "3", "--model.n_bits", "3", "--train.global_batch_size", "8", "--train.steps", "5",
         "--train.warmup_steps", "2", "--train.log_interval", "1", "--eval.interval", "0",
         "--checkpoint.enable", "false", "--metrics.tensorboard", "false"]  # fmt: skip
RTOL = 1e-5
LAYOUTS = {
    "ddp2": (2, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"]),
    "fsdp2": (2, ["--parallel.dp_shard", "2"]),
    "accum4": (1, ["--train.micro_batch_size", "2"]),
}


def perturbed_model(**fields) -> PixelCNN:
    """A float64 PixelCNN with every weight moved off its init (the zero-initialized head would hide
    dependencies)."""
    with torch.device("meta"):
        model = PixelCNN(PixelCNNConfig(**fields))
    init_model(model, "cpu", 0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.double()


def dependencies(model: PixelCNN, size: int) -> torch.Tensor:
    """deps[c, r, w, c', r', w']: whether any output of sub-pixel (c, r, w) has a non-zero gradient with
    respect to input (c', r', w'), over a batch of 4 random images of every class."""
    C = model.cfg.in_channels
    x = torch.rand(4, C, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    x.requires_grad_(True)
    out = model.subpixel_outputs(x, torch.arange(4) % max(1, model.cfg.num_classes))  # (B, C, F, H, W)
    deps = torch.zeros(C, size, size, C, size, size, dtype=torch.bool)
    for c, r, w in itertools.product(range(C), range(size), range(size)):
        (grad,) = torch.autograd.grad(out[:, c, :, r, w].sum(), x, retain_graph=True)
        deps[c, r, w] = grad.abs().sum(0) > 0
    return deps


@pytest.mark.parametrize("output", ["softmax", "logistic_mixture"])
def test_each_subpixel_depends_on_exactly_the_subpixels_before_it(output):
    """Mutations that fail it: mask type B in the first layer (R then sees itself), or the vertical stack's
    output passed to the horizontal one without the down-shift (the pixel sees its own row to the right)."""
    C, S = 3, 6
    model = perturbed_model(image_size=S, n_bits=2, hidden=12, n_layers=4, first_kernel_size=5, num_classes=3,
                            output=output, n_mixtures=2)  # fmt: skip
    order = torch.tensor([[[(r * S + w) * C + c for w in range(S)] for r in range(S)] for c in range(C)])
    before = order[None, None, None] < order[:, :, :, None, None, None]
    deps = dependencies(model, S)
    assert not (deps & ~before).any(), f"{int((deps & ~before).sum())} dependencies on the present or future"
    assert (deps == before).all(), f"{int((before & ~deps).sum())} past sub-pixels outside the receptive field"


class NaiveMaskedStack(nn.Module):
    """PixelCNN without the two stacks: masked 3x3 convolutions (centre excluded in the first), the design
    whose receptive field has a blind spot up and to the right."""

    def __init__(self, layers: int, width: int = 8) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3 if i == 0 else width, width, 3, padding=1) for i in range(layers)])
        mask = torch.ones(3, 3)
        mask[1, 2:] = 0
        mask[2:] = 0
        self.masks = [mask.clone() for _ in range(layers)]
        self.masks[0][1, 1] = 0  # the first layer does not see the current pixel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, mask in zip(self.convs, self.masks, strict=True):
            x = torch.tanh(F.conv2d(x, conv.weight * mask, conv.bias, padding=1))
        return x


def _reaches(output_BFHW: torch.Tensor, x: torch.Tensor, at: tuple[int, int], source: tuple[int, int]) -> bool:
    (grad,) = torch.autograd.grad(output_BFHW[:, :, at[0], at[1]].sum(), x)
    return bool(grad[:, :, source[0], source[1]].abs().sum() > 0)


@pytest.mark.parametrize("n_layers", [2, 3, 5])
def test_the_vertical_stack_sees_the_naive_stacks_blind_spot(n_layers):
    """Pixel (4, 2) and input pixel (3, 5), one row up and three columns right. A naive masked 3x3 stack never
    reaches it (checked at depth 8); the Gated PixelCNN's vertical stack widens by one column each side per
    layer of kernel 3, so it arrives at 3 layers, while (4, 3), the next pixel, stays unseen at every depth.
    Mutation that fails it: the vertical kernel cut to the columns <= the current one (a naive half-kernel)."""
    model = perturbed_model(image_size=8, n_bits=2, hidden=12, n_layers=n_layers, kernel_size=3,
                            first_kernel_size=3, num_classes=0)  # fmt: skip
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    outputs = model.subpixel_outputs(x, torch.zeros(4, dtype=torch.long)).flatten(1, 2)
    assert _reaches(outputs, x, (4, 2), (3, 5)) == (n_layers >= 3)
    outputs = model.subpixel_outputs(x, torch.zeros(4, dtype=torch.long)).flatten(1, 2)
    assert not _reaches(outputs, x, (4, 2), (4, 3))

    naive = NaiveMaskedStack(layers=8).double()
    assert _reaches(naive(x), x, (4, 2), (2, 4))  # it does see up-and-right along the diagonal...
    assert not _reaches(naive(x), x, (4, 2), (3, 5))  # ...but not this side of it


@pytest.mark.parametrize("output", ["softmax", "logistic_mixture"])
def test_the_probabilities_of_every_image_sum_to_one(output):
    """All 2^12 images of 2x2 RGB pixels at 1 bit, one class: sum p(x) = 1 (to 1e-9, float64). Needs the
    softmax's channel order, the mixture's open end bins and shared component, and causality together."""
    model = perturbed_model(image_size=2, n_bits=1, hidden=6, n_layers=2, first_kernel_size=3, num_classes=2,
                            output=output, n_mixtures=3)  # fmt: skip
    bits = torch.tensor(list(itertools.product([0.0, 1.0], repeat=12)), dtype=torch.float64).view(-1, 3, 2, 2)
    image = levels_to_image(bits, 1)
    bits_per_dim = model(image, torch.ones(len(image), dtype=torch.long), mode="bits")
    total = torch.exp2(-bits_per_dim * 12).sum()
    assert abs(total.item() - 1) < 1e-9, total.item()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    cache = {}

    def get(output: str) -> list[dict]:
        if output not in cache:
            overrides = SMALL + ["--model.output", output]
            cache[output] = run_layout(TINY, overrides, tmp_path_factory.mktemp(output), "one", 1)
        return cache[output]

    return get


@pytest.mark.parametrize(
    ("output", "layout"),
    [("softmax", "ddp2"), ("softmax", "fsdp2"), ("softmax", "accum4"), ("logistic_mixture", "fsdp2")],
)
def test_pixelcnn_layouts_match_one_process(output, layout, single, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    rows = run_layout(TINY, SMALL + ["--model.output", output] + overrides, tmp_path, layout, nproc=nproc)
    report = compare(single(output), rows)
    assert len(report.steps) == 5
    if output == "softmax":  # starts at the uniform 3 bits; the mixture's start is above it and noisier
        assert report.loss_a[-1] < report.loss_a[0]
    assert report.max_loss_rel_diff <= RTOL and report.max_grad_norm_rel_diff <= RTOL, report.table()


def test_train_evaluate_and_sample_one_class_from_the_ema_weights(tmp_path, capsys):
    """Two steps with an EMA and a checkpoint, eval at the end (held-out bits/dim below the 3-bit uniform
    baseline's neighbourhood, a sampled grid), then `scaletrain sample --class 2` from the EMA weights."""
    from PIL import Image

    from scaletrain.recipes.pixelcnn.sample import sample

    cmd = [sys.executable, "-m", "scaletrain.train", TINY, *SMALL, "--train.steps", "2", "--train.warmup_steps", "0",
           "--train.ema_decay", "0.9", "--eval.interval", "2", "--model.eval_grid", "3", "--eval.num_samples", "8",
           "--checkpoint.enable", "true", "--checkpoint.interval", "2", "--job.run_dir", str(tmp_path),
           "--job.name", "run"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/bits_per_dim_heldout" in r]
    assert evals and 0 < evals[-1]["eval/bits_per_dim_heldout"] < 3.5 and evals[-1]["eval/bits_per_dim_uniform"] == 3
    out = tmp_path / "grid.png"
    sample([str(tmp_path / "run" / "checkpoints" / "step-00000002"), "--n", "4", "--class", "2",
            "--temperature", "0.8", "--out", str(out)])  # fmt: skip
    assert "4 images at temperature 0.8" in capsys.readouterr().out
    with Image.open(out) as grid:
        assert grid.size == (2 + 4 * (8 + 2), 2 + 1 * (8 + 2))  # one row of 4 images, 2 px padding


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--model.kernel_size", "4"], r"model\.kernel_size: 4 is not allowed; use an odd size >= 3"),
        (["--model.first_kernel_size", "6"], r"model\.first_kernel_size: 6 is not allowed; use an odd size"),
        (["--model.n_bits", "9"], r"model\.n_bits: 9 is not allowed; use 1\.\.8"),
        (["--model.n_bits", "0"], r"model\.n_bits: 0 is not allowed; use 1\.\.8"),
        (["--model.num_classes", "7"], r"model\.num_classes: 7 is not allowed with data\.source=shapes"),
    ],
    ids=["even_kernel", "even_first_kernel", "n_bits_9", "n_bits_0", "too_many_classes"],
)
def test_bad_pixelcnn_config_is_refused_before_compute(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_config(load_config(TINY, overrides), 1)


def test_class_conditioning_on_an_unlabelled_folder_is_refused(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    overrides = ["--data.source", "folder", "--data.path", str(tmp_path), "--model.num_classes", "3"]
    with pytest.raises(ValueError, match=r"model\.num_classes: class conditioning \(3 classes\) needs labelled"):
        validate_config(load_config(TINY, overrides), 1)


def test_config_show_counts_parameters_and_flops():
    done = subprocess.run([sys.executable, "-m", "scaletrain.cli", "config", "show", TINY], capture_output=True,
                          text=True, check=True)  # fmt: skip
    lines = {k.strip("# ").strip(): v for k, _, v in (line.partition(":") for line in done.stdout.splitlines())}
    assert int(lines["parameters"].replace(",", "")) == sum(
        p.numel() for p in PixelCNN(load_config(TINY, []).model).parameters()
    )
    assert int(lines["train_flops_per_sample"].replace(",", "")) > 0

"""FLOP counting: closed forms for Linear/Conv, a transformer block vs 6*N*T, meta == real CPU."""

from __future__ import annotations

import copy
import resource

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.metrics import count_forward_flops, count_train_flops


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


class Block(nn.Module):
    """Pre-norm decoder block: 12*d^2 matmul weights (qkv 3, proj 1, MLP 8)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_mlp_closed_form(device: str) -> None:
    n, d_in, hidden, d_out = 8, 64, 128, 32
    with torch.device(device):
        model = _mlp(d_in, hidden, d_out)
        x = torch.randn(n, d_in)
    layer1, layer2 = 2 * n * d_in * hidden, 2 * n * hidden * d_out
    assert count_forward_flops(model, (x,)) == layer1 + layer2
    # Backward: layer 2 needs dW and dX (2x its forward); layer 1 only dW, because the
    # raw input does not require grad and autograd skips its gradient.
    assert count_train_flops(model, (x,)) == (layer1 + layer2) + 2 * layer2 + layer1
    # With an input that requires grad every layer pays the full 3x.
    assert count_train_flops(model, (x.requires_grad_(),)) == 3 * (layer1 + layer2)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_conv_closed_form(device: str) -> None:
    b, c_in, c_out, k, h, w = 2, 3, 16, 3, 20, 12
    with torch.device(device):
        conv = nn.Conv2d(c_in, c_out, k, padding=1)
        x = torch.randn(b, c_in, h, w, requires_grad=True)
    forward = 2 * b * c_out * h * w * c_in * k * k  # "same" padding keeps h x w
    assert count_forward_flops(conv, (x,)) == forward
    assert count_train_flops(conv, (x,)) == 3 * forward


def test_transformer_block_matches_6NT_estimate() -> None:
    dim, heads, batch, seq = 256, 4, 2, 128
    with torch.device("meta"):
        block = Block(dim, heads)
        x = torch.randn(batch, seq, dim)
    flops = count_train_flops(block, (x,))
    tokens = batch * seq
    matmul_params = 12 * dim * dim
    # Exact: 6 FLOPs per matmul weight per token, plus attention scores/values (4*b*s^2*d
    # forward, counted as full — not halved — for causal), times 3 for fwd + bwd.
    assert flops == 6 * tokens * matmul_params + 3 * 4 * batch * seq * seq * dim
    # The usual 6*N*T with N = all parameters: attention adds s/(6d) ~ 8% here and the
    # norm/bias parameters that do no matmul pull the other way by < 1%.
    n_params = sum(p.numel() for p in block.parameters())
    ratio = flops / (6 * n_params * tokens)
    assert 1.0 < ratio < 1.0 + seq / (6 * dim) + 0.01, ratio


def test_meta_equals_real_cpu_copy() -> None:
    torch.manual_seed(0)
    real = nn.Sequential(Block(64, 4), Block(64, 4), nn.Linear(64, 100))
    x = torch.randn(2, 16, 64)
    meta = copy.deepcopy(real).to("meta")
    assert count_train_flops(meta, (x.to("meta"),)) == count_train_flops(real, (x,)) > 0
    assert count_forward_flops(meta, (x.to("meta"),)) == count_forward_flops(real, (x,)) > 0


def test_meta_counts_a_huge_model_without_memory() -> None:
    # 8 x 16384^2 weights = 2.1B parameters = 8.6 GB in fp32 (17 GB with grads): a real
    # allocation would blow the peak RSS up by gigabytes (or OOM the test machine).
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(16384, 16384, bias=False) for _ in range(8)])
        x = torch.randn(4, 16384, requires_grad=True)
    flops = count_train_flops(model, (x,))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert flops == 3 * 2 * 4 * 8 * 16384 * 16384
    assert grown_mib < 200, f"peak RSS grew {grown_mib:.0f} MiB while counting on meta"


def test_grads_are_left_as_they_were() -> None:
    model = _mlp(8, 16, 4)
    x = torch.randn(3, 8)
    count_train_flops(model, (x,))
    assert all(p.grad is None for p in model.parameters())
    # Gradients already accumulated (mid-training) survive unchanged, not doubled.
    model(x).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    count_train_flops(model, (x,))
    for param, grad in zip(model.parameters(), before, strict=True):
        assert torch.equal(param.grad, grad)


def test_tuple_dict_outputs_and_loss_fn() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 6)

        def forward(self, x: torch.Tensor) -> dict[str, object]:
            return {"a": self.a(x), "rest": (self.b(x), torch.arange(3))}

    model, x = TwoHeads(), torch.randn(5, 8)
    both = 3 * 2 * 5 * 8 * (4 + 6) - 2 * 5 * 8 * (4 + 6)  # no input grad for x
    assert count_train_flops(model, (x,)) == both
    # A loss that only uses head "a": head "b" gets no backward at all.
    only_a = count_train_flops(model, (x,), loss_fn=lambda out: out["a"].square().mean())
    assert only_a == 2 * (2 * 5 * 8 * 4) + 2 * 5 * 8 * 6


def test_no_differentiable_output_is_a_clear_error() -> None:
    model = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(ValueError, match="loss_fn"):
        count_train_flops(model, (torch.randn(2, 4),))

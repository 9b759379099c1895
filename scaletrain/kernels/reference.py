"""Plain-torch references for every fused kernel: the ground truth in tests and the CPU/no-Triton fallback.

They are written for clarity, not speed or memory: attention materializes the full [T, S] score matrix
and the cross-entropy reference materializes the full [N, V] logits. All math is done in fp32 and the
result is cast back to the input dtype, mirroring what the kernels do.

Shape legend: B batch, C channels, H query heads, Hkv key/value heads, T query length, S key length, D head dim,
N rows (tokens), V vocabulary.
"""

import torch
import torch.nn.functional as F


def attention_mask(t: int, s: int, *, causal: bool, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [T, S] mask, True where query i may attend to key j.

    Positions are aligned bottom-right: query i sits at absolute position ``i + (S - T)`` so the last query
    lines up with the last key (the KV-cache / chunked-prefill convention, same as FlashAttention >= 2.1).
    ``causal`` keeps keys at or before the query position; ``window`` keeps keys strictly less than
    ``window`` positions before it (key_pos > query_pos - window), i.e. with causal each query sees at most
    ``window`` keys including itself. ``window`` without ``causal`` only bounds the left side.
    """
    q_pos = torch.arange(t, device=device)[:, None] + (s - t)
    k_pos = torch.arange(s, device=device)[None, :]
    mask = torch.ones(t, s, dtype=torch.bool, device=device)
    if causal:
        mask &= k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def attention_reference(
    q_BHTD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (out [B,H,T,D] in q's dtype, lse [B,H,T] fp32). Rows with no visible key give out=0, lse=-inf."""
    b, h, t, d = q_BHTD.shape
    hkv, s = k_BHSD.shape[1], k_BHSD.shape[2]
    scale = d**-0.5 if scale is None else scale
    group = h // hkv
    k = k_BHSD.float().repeat_interleave(group, dim=1)
    v = v_BHSD.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhtd,bhsd->bhts", q_BHTD.float(), k) * scale
    mask = attention_mask(t, s, causal=causal, window=window, device=q_BHTD.device)
    row_visible = mask.any(-1)[:, None]  # [T, 1]
    # Fully-masked rows would give NaN (exp(-inf - -inf)); give them finite scores and zero them afterwards.
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~row_visible, 0.0)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]) * row_visible
    out = torch.einsum("bhts,bhsd->bhtd", probs, v)
    lse = lse.masked_fill(~row_visible[:, 0], float("-inf"))
    return out.to(q_BHTD.dtype), lse


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32, returned in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim (biased variance, as nn.LayerNorm),
    weight / bias optional; computed in fp32, returned in x's dtype."""
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt((xf - mean).pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def layer_norm_modulate_reference(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """adaLN (DiT): layer_norm(x) * (1 + scale) + shift with x [B, ..., N] and shift / scale [B, N] broadcast
    over the middle dims; in fp32, returned in x's dtype."""
    view = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    y = layer_norm_reference(x.float(), weight, bias, eps)
    return (y * (1 + scale.float().view(view)) + shift.float().view(view)).to(x.dtype)


def group_norm_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    silu: bool = False,
) -> torch.Tensor:
    """GroupNorm of x [B, C, *spatial]: each of the num_groups groups of C / num_groups channels (over all
    spatial positions) normalized to (x - mean) / sqrt(var + eps) (biased variance, as nn.GroupNorm), then
    * weight[c] + bias[c] (optional, [C]) and silu(.) when ``silu``; computed in fp32, returned in x's dtype."""
    b, c = x.shape[0], x.shape[1]
    xf = x.float().reshape(b, num_groups, -1)
    mean = xf.mean(-1, keepdim=True)
    y = ((xf - mean) * torch.rsqrt((xf - mean).pow(2).mean(-1, keepdim=True) + eps)).reshape(x.shape)
    view = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.float().view(view)
    if bias is not None:
        y = y + bias.float().view(view)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(
    q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, cos_TD2: torch.Tensor, sin_TD2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE: x*cos + rotate_half(x)*sin with cos/sin [T, D/2] repeated twice along D."""
    t = q_BTHD.shape[1]
    cos = torch.cat((cos_TD2[:t], cos_TD2[:t]), dim=-1).float()[None, :, None, :]
    sin = torch.cat((sin_TD2[:t], sin_TD2[:t]), dim=-1).float()[None, :, None, :]

    def rot(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype)

    return rot(q_BTHD), rot(k_BTHD)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in fp32, returned in gate's dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def fused_linear_cross_entropy_reference(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    ignore_index: int = -100,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Mean over non-ignored rows of CE(logits) + z_loss * logsumexp(logits)^2; materializes [N, V]."""
    logits = (hidden_ND @ weight_VD.T).float()
    valid = targets_N != ignore_index
    lse = torch.logsumexp(logits, dim=-1)
    safe_t = torch.where(valid, targets_N, 0)
    target_logit = logits.gather(1, safe_t[:, None])[:, 0]
    per_row = (lse - target_logit + z_loss * lse.pow(2)) * valid
    return per_row.sum() / valid.sum().clamp(min=1)

"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision").

Two towers map an image and a caption to one embedding space:
  image: ViT (Dosovitskiy et al. 2021): patches -> linear embedding, a class token, learned positions,
         pre-LN transformer blocks; the class token's output, layer-normed, projected to embed_dim.
  text:  token embeddings + learned positions, pre-LN transformer blocks (causal as in CLIP, or
         bidirectional with the padding masked out); the <eot> token's output (CLIP) or the mean over the
         caption's tokens, layer-normed, projected to embed_dim.
Both embeddings are L2-normalized; their cosine similarity times a learned temperature exp(t) are the logits
of a symmetric cross-entropy over the batch (each image against every caption, and each caption against every
image). t starts at log(1/0.07) and exp(t) is clamped at 100, as in the paper.

The contrastive loss over the GLOBAL batch (`contrastive_loss`): each data-parallel rank all-gathers every
rank's embeddings (`GatherRows`, whose backward sums every rank's gradient of a row and hands it to the row's
owner), and scores its own rows against all N columns. Its loss is the mean over its own rows, so the
trainer's mean over ranks is the one-process loss of the N x N logits, and DDP/FSDP's mean of the gradients
is that loss's gradient (each rank's local loss reaches the other ranks' embeddings through the gather).

Shape legend: B batch (this rank), N global batch, T tokens, P patches, D width, E embed_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from scaletrain.config.schema import opt
from scaletrain.recipes.clip.captions import EOT_ID, PAD_ID, VOCAB

MAX_LOGIT_SCALE = math.log(100.0)  # the paper clips the temperature so that logits are scaled by at most 100


@dataclass
class CLIPConfig:
    image_size: int = opt(16, "Image side; a multiple of patch_size.")
    in_channels: int = opt(3, "Image channels (3 for the shapes data set).")
    num_classes: int = opt(6, "Shape classes in the data (2..6): the zero-shot classes.")
    patch_size: int = opt(4, "ViT patch side: (image_size / patch_size)^2 patches plus a class token.")
    vision_width: int = opt(64, "Width of the image transformer.")
    vision_layers: int = opt(2, "Blocks of the image transformer.")
    vision_heads: int = opt(4, "Attention heads of the image transformer (divide vision_width).")
    context_length: int = opt(16, "Tokens per caption with <sot> and <eot>; longer captions are refused.")
    text_width: int = opt(64, "Width of the text transformer.")
    text_layers: int = opt(2, "Blocks of the text transformer.")
    text_heads: int = opt(4, "Attention heads of the text transformer (divide text_width).")
    causal: bool = opt(True, "Causal text attention (CLIP); false = bidirectional, padding masked.")
    pooling: Literal["eot", "mean"] = opt("eot", "Text feature: the <eot> token's output (CLIP) or the tokens' mean.")
    mlp_ratio: int = opt(4, "Hidden units of each block's MLP per unit of width.")
    embed_dim: int = opt(32, "Size of the shared image-text embedding.")
    init_temperature: float = opt(0.07, "Softmax temperature at init: logit scale log(1/T) (the paper: 0.07).")


def local(param: torch.Tensor) -> torch.Tensor:
    """A parameter used directly in a forward, as a plain tensor: under tensor parallel the parameters outside
    the blocks' split projections are DTensors replicated over the tp ranks (identical there, like their
    gradients), which plain activations cannot mix with."""
    return param.to_local() if isinstance(param, DTensor) else param


class Attention(nn.Module):
    """Multi-head self-attention. q, k, v are separate projections so a tensor-parallel plan can split heads."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.head_dim = width // heads
        self.wq, self.wk, self.wv = (nn.Linear(width, width) for _ in range(3))
        self.wo = nn.Linear(width, width)

    def forward(self, x_BTD: torch.Tensor, mask_BTT: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        # -1: the heads this rank holds (all of them unless tensor parallel splits them)
        q, k, v = (w(x_BTD).view(B, T, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        mask = None if mask_BTT is None else mask_BTT[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block (the unit of activation checkpointing, compile and FSDP)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.mlp = MLP(width, mlp_ratio * width)

    def forward(self, x_BTD: torch.Tensor, mask_BTT: torch.Tensor | None = None) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.ln_1(x_BTD), mask_BTT)
        return x_BTD + self.mlp(self.ln_2(x_BTD))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        width, patches = cfg.vision_width, (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(cfg.in_channels, width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(patches + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(Block(width, cfg.vision_heads, cfg.mlp_ratio) for _ in range(cfg.vision_layers))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, cfg.embed_dim, bias=False)

    def forward(self, image_BCHW: torch.Tensor) -> torch.Tensor:
        x_BPD = self.patch_embed(image_BCHW).flatten(2).transpose(1, 2)
        cls_B1D = local(self.class_embedding).to(x_BPD.dtype).expand(x_BPD.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls_B1D, x_BPD], dim=1) + local(self.positional_embedding))
        for block in self.blocks:
            x = block(x)
        return self.proj(self.ln_post(x[:, 0]))


class TextTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.causal, self.pooling = cfg.causal, cfg.pooling
        self.token_embedding = nn.Embedding(len(VOCAB), cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.blocks = nn.ModuleList(
            Block(cfg.text_width, cfg.text_heads, cfg.mlp_ratio) for _ in range(cfg.text_layers)
        )
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        T = tokens_BT.shape[1]
        valid_BT = tokens_BT != PAD_ID
        if self.causal:
            # Padding sits after <eot>, so causal attention never lets it reach a caption token.
            mask_BTT = torch.ones(T, T, dtype=torch.bool, device=tokens_BT.device).tril().expand(len(tokens_BT), T, T)
        else:
            mask_BTT = valid_BT[:, None, :].expand(-1, T, -1)  # every query sees the caption's tokens only
        x = self.token_embedding(tokens_BT) + local(self.positional_embedding)[:T]
        for block in self.blocks:
            x = block(x, mask_BTT)
        x = self.ln_final(x)
        if self.pooling == "eot":
            pooled_BD = x[torch.arange(len(x), device=x.device), (tokens_BT == EOT_ID).int().argmax(dim=1)]
        else:
            weights_BT1 = valid_BT.to(x.dtype)[..., None]
            pooled_BD = (x * weights_BT1).sum(1) / weights_BT1.sum(1)
        return self.proj(pooled_BD)


class GatherRows(torch.autograd.Function):
    """(B, E) on each rank -> (N, E) in rank order; backward: each row's gradient summed over the ranks (every
    rank's loss uses every row) and handed to the row's owner.

    torch.distributed.nn.functional.all_gather does the same, but its gloo backward (scatter given group ranks
    as global ranks, torch 2.13) fails on a group that is not ranks 0..k-1, such as dp under tensor parallel."""

    @staticmethod
    def forward(ctx: Any, x_BE: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        out_NE = x_BE.new_empty((dist.get_world_size(group) * x_BE.shape[0], *x_BE.shape[1:]))
        dist.all_gather_into_tensor(out_NE, x_BE.contiguous(), group=group)
        return out_NE

    @staticmethod
    def backward(ctx: Any, grad_NE: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad_NE = grad_NE.contiguous().clone()
        dist.all_reduce(grad_NE, group=ctx.group)  # small (N x E): no need for a reduce-scatter
        return grad_NE.chunk(dist.get_world_size(ctx.group))[dist.get_rank(ctx.group)], None


def contrastive_loss(image_BE: torch.Tensor, text_BE: torch.Tensor, logit_scale: torch.Tensor,
                     group: dist.ProcessGroup | None) -> torch.Tensor:  # fmt: skip
    """This rank's rows of the symmetric InfoNCE over the global batch: mean over its own B images and B captions
    of the cross-entropy against all N captions / images. Embeddings are normalized; logits in fp32."""
    image_BE, text_BE = F.normalize(image_BE.float(), dim=-1), F.normalize(text_BE.float(), dim=-1)
    if group is None:
        image_NE, text_NE, offset = image_BE, text_BE, 0
    else:
        image_NE, text_NE = GatherRows.apply(image_BE, group), GatherRows.apply(text_BE, group)
        offset = dist.get_rank(group) * len(image_BE)
    scale = logit_scale.float().clamp(max=MAX_LOGIT_SCALE).exp()
    target_B = torch.arange(offset, offset + len(image_BE), device=image_BE.device)
    image_to_text_BN = scale * image_BE @ text_NE.T
    text_to_image_BN = scale * text_BE @ image_NE.T
    return (F.cross_entropy(image_to_text_BN, target_B) + F.cross_entropy(text_to_image_BN, target_B)) / 2


class CLIP(nn.Module):
    """The two towers and the temperature. forward(image, tokens) is the training loss; mode="embed" returns
    the normalized embeddings (either input may be None), through the root forward so every layout's hooks run.
    """

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg)
        self.text = TextTransformer(cfg)
        self.logit_scale = nn.Parameter(torch.empty(1))  # 1-D: FSDP2 shards dim 0
        # The data-parallel group the loss gathers over; set by the recipe's parallelize (None: one rank).
        self.contrastive_group: dist.ProcessGroup | None = None

    def blocks(self) -> list[Block]:
        return [*self.visual.blocks, *self.text.blocks]

    def forward(self, image_BCHW: torch.Tensor | None, tokens_BT: torch.Tensor | None,
                mode: Literal["loss", "embed"] = "loss") -> torch.Tensor | tuple:  # fmt: skip
        image_BE = None if image_BCHW is None else self.visual(image_BCHW)
        text_BE = None if tokens_BT is None else self.text(tokens_BT)
        if mode == "embed":
            return tuple(None if e is None else F.normalize(e.float(), dim=-1) for e in (image_BE, text_BE))
        return contrastive_loss(image_BE, text_BE, local(self.logit_scale), self.contrastive_group)

    def init_tensor(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        """CLIP's init (openai/CLIP model.py): token embeddings N(0, 0.02), text positions N(0, 0.01), ViT class
        token and positions N(0, width^-1/2); attention N(0, width^-1/2), its output and the MLP's second layer
        N(0, (2 layers width)^-1/2), the MLP's first N(0, (2 width)^-1/2); projections N(0, width^-1/2); biases
        zero, LayerNorm 1/0; patch conv N(0, fan_in^-1/2); logit scale log(1/init_temperature)."""
        cfg, leaf = self.cfg, name.rsplit(".", 1)[-1]
        if name == "logit_scale":
            tensor.fill_(math.log(1 / cfg.init_temperature))
            return
        tower = name.split(".", 1)[0]
        visual = tower == "visual"
        width, layers = (cfg.vision_width, cfg.vision_layers) if visual else (cfg.text_width, cfg.text_layers)
        module = self.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(module, nn.LayerNorm):
            tensor.fill_(1.0 if leaf == "weight" else 0.0)
        elif leaf == "bias":
            tensor.zero_()
        elif name == "text.token_embedding.weight":
            tensor.normal_(0, 0.02, generator=generator)
        elif name == "text.positional_embedding":
            tensor.normal_(0, 0.01, generator=generator)
        elif name in ("visual.class_embedding", "visual.positional_embedding") or name.endswith(
            (".wq.weight", ".wk.weight", ".wv.weight", "proj.weight")
        ):
            tensor.normal_(0, width**-0.5, generator=generator)
        elif name.endswith((".wo.weight", ".fc2.weight")):
            tensor.normal_(0, (2 * layers * width) ** -0.5, generator=generator)
        elif name.endswith(".fc1.weight"):
            tensor.normal_(0, (2 * width) ** -0.5, generator=generator)
        elif name == "visual.patch_embed.weight":
            tensor.normal_(0, tensor[0].numel() ** -0.5, generator=generator)
        else:
            raise KeyError(f"CLIP.init_tensor does not know how to initialize {name!r}")

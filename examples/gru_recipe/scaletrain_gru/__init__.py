"""A GRU language model as a scaletrain recipe living in its own package (docs/recipes.md walks through it).

Everything a data-parallel family needs, and nothing else: config dataclasses, a plain nn.Module that
initializes every tensor by name, a `parallelize` built from `scaletrain.parallel`'s helpers, a dataset whose
item i is a pure function of i, the inputs and the loss. Importing this module registers the recipe; the
`scaletrain.recipes` entry point in pyproject.toml is how scaletrain finds it.

Shapes: B batch, T sequence, D model dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.config.schema import JobConfig, opt
from scaletrain.data import ByteTokenizer, TokenWindowDataset, bundled_corpus_path, load_tokens
from scaletrain.parallel import ParallelDims, checkpoint_compile_and_shard
from scaletrain.registry import DataSpec, ModelSpec, Recipe, StepSpec, register_recipe


@dataclass
class GRUConfig:
    vocab_size: int = opt(264, "Vocabulary size (>= 257, the byte tokenizer's).")
    dim: int = opt(128, "Hidden size D of every layer.")
    n_layers: int = opt(2, "Stacked GRU layers, each with a residual connection.")
    init_std: float = opt(0.02, "Std of the embedding and output weights.")


@dataclass
class GRUDataConfig:
    seq_len: int = opt(64, "Tokens per training sample (the GRU runs over them one step at a time).")


class GRUBlock(nn.Module):
    """x + GRU(LayerNorm(x)). nn.GRUCell reads its weights at each call, so FSDP2's sharded parameters work
    (nn.GRU caches flattened weights, which FSDP2's parameter swaps would leave stale)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.cell = nn.GRUCell(dim, dim)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        h_BD = x_BTD.new_zeros(x_BTD.shape[0], x_BTD.shape[2])
        normed_BTD = self.norm(x_BTD)
        outputs = []
        for t in range(x_BTD.shape[1]):
            h_BD = self.cell(normed_BTD[:, t], h_BD)
            outputs.append(h_BD)
        return x_BTD + torch.stack(outputs, dim=1)


class GRULM(nn.Module):
    def __init__(self, cfg: GRUConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(GRUBlock(cfg.dim) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        x_BTD = self.embed(tokens_BT)
        for layer in self.layers:
            x_BTD = layer(x_BTD)
        return self.output(self.norm(x_BTD))  # logits [B, T, V]

    def init_tensor(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        """The full value of parameter `name`; scaletrain calls it for every tensor, whatever the layout."""
        leaf = name.rsplit(".", 1)[-1]
        if ".norm." in name or name.startswith("norm."):
            tensor.fill_(1.0 if leaf == "weight" else 0.0)
        elif name in ("embed.weight", "output.weight"):
            nn.init.normal_(tensor, std=self.cfg.init_std, generator=generator)
        elif ".cell." in name:  # nn.GRUCell's own rule: uniform in +-1/sqrt(D)
            bound = 1 / math.sqrt(self.cfg.dim)
            nn.init.uniform_(tensor, -bound, bound, generator=generator)
        else:
            raise KeyError(f"GRULM.init_tensor does not know how to initialize {name!r}")


def parallelize(model: GRULM, dims: ParallelDims, cfg: JobConfig) -> GRULM:
    """Data parallel only: checkpointing and compile per layer, then FSDP2 / HSDP / DDP as `dims` ask."""
    blocks = list(model.layers)
    return checkpoint_compile_and_shard(model, blocks, dims, cfg)


def build_dataset(cfg: JobConfig) -> TokenWindowDataset:
    seq_len = cfg.data.seq_len
    return TokenWindowDataset(load_tokens(str(bundled_corpus_path()), ByteTokenizer(), seq_len=seq_len), seq_len)


def validate(cfg: JobConfig, dims: ParallelDims) -> None:
    m = cfg.model
    for name in ("dim", "n_layers"):
        if getattr(m, name) < 1:
            raise ValueError(f"model.{name}: {getattr(m, name)} is not allowed; use >= 1")
    if m.vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(f"model.vocab_size: {m.vocab_size} is smaller than the byte tokenizer's 257")
    if cfg.data.seq_len < 1:
        raise ValueError(f"data.seq_len: {cfg.data.seq_len} is not allowed; use >= 1")


def loss(logits_BTV: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(logits_BTV.flatten(0, 1).float(), batch["target"].flatten())


RECIPE = register_recipe(
    Recipe(
        name="gru",
        model=ModelSpec(config=GRUConfig, build=GRULM, parallelize=parallelize),
        data=DataSpec(
            config=GRUDataConfig,
            build_dataset=build_dataset,
            unit="tokens",
            units_per_sample=lambda cfg: cfg.data.seq_len,
        ),
        step=StepSpec(model_inputs=lambda batch: (batch["input"],), loss=loss),
        validate=validate,
    )
)

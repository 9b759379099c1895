"""GPT / Llama recipe: decoder-only language models on text or token files.

Configs: scaletrain/recipes/gpt/configs/ (tiny for a CPU; gpt2-small; llama 1B, 8B, 70B for GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate

from scaletrain import ops
from scaletrain.config import MissingDataError
from scaletrain.config.schema import TORCH_DTYPES, JobConfig, opt
from scaletrain.data import TokenWindowDataset, bundled_corpus_path, load_tokenizer, load_tokens
from scaletrain.distributed import training_device_type
from scaletrain.parallel.dims import ParallelDims, divisors
from scaletrain.recipes.gpt import hf, megatron
from scaletrain.recipes.gpt.bench_baselines import bench_baselines
from scaletrain.recipes.gpt.model import GPT, GPTConfig
from scaletrain.recipes.gpt.moe import MoE, active_parameters, load_heatmap, relative_load, update_balancing
from scaletrain.recipes.gpt.parallelize import parallelize_gpt
from scaletrain.registry import (
    DataSpec,
    EvalSpec,
    HFInterop,
    MegatronInterop,
    ModelSpec,
    ParallelSupport,
    PipelineSpec,
    Recipe,
    StepSpec,
    register_recipe,
)
from scaletrain.validate import check_all


@dataclass
class TextDataConfig:
    path: str = opt("bundled", "Text (.txt) or token-id file (.bin/.npy); 'bundled' = the shipped corpus.")
    tokenizer: str = opt("byte", "'byte' or a path to a tokenizer .json (see `scaletrain tokenizer train`).")
    token_dtype: Literal["uint16", "uint32"] = opt("uint16", "On-disk dtype of .bin token files.")
    seq_len: int = opt(128, "Tokens per training sample.")
    num_workers: int = opt(0, "Background loader processes (0 = load in the training process).")


def _data_path(cfg: JobConfig) -> str:
    return str(bundled_corpus_path()) if cfg.data.path == "bundled" else cfg.data.path


def build_dataset(cfg: JobConfig) -> TokenWindowDataset:
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    tokens = load_tokens(_data_path(cfg), tokenizer, cfg.data.token_dtype, seq_len=cfg.data.seq_len)
    return TokenWindowDataset(tokens, cfg.data.seq_len)


def model_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    # The targets go in too: with train.fused_cross_entropy the model computes the loss inside its
    # forward (the logits never exist); otherwise GPT.forward ignores them.
    if "target" in batch:
        return (batch["input"], batch["target"])
    return (batch["input"],)


def example_batch(cfg: JobConfig, batch_size: int) -> dict[str, torch.Tensor]:
    shape = (batch_size, cfg.data.seq_len)
    return {
        "input": torch.zeros(shape, dtype=torch.long, device="meta"),
        "target": torch.zeros(shape, dtype=torch.long, device="meta"),
    }


def loss(output: torch.Tensor | tuple[torch.Tensor, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    balancing = 0.0
    if isinstance(output, tuple):  # MoE: (logits, the blocks' balancing losses)
        output, balancing = output
    if output.dim() == 0:  # train.fused_cross_entropy: the model already returned the mean loss
        return output
    # fp32 softmax: bf16 logits lose the small probabilities that cross-entropy depends on.
    ce = F.cross_entropy(output.flatten(0, 1).float(), batch["target"].flatten())
    if isinstance(ce, DTensor) and isinstance(balancing, torch.Tensor):
        # Loss parallel: the loss is a DTensor replicated over tp, and so are the balancing losses (MoE.route).
        balancing = DTensor.from_local(balancing, ce.device_mesh, [Replicate()])
    return ce + balancing


def with_depth(model: GPTConfig, n_layers: int) -> GPTConfig | None:
    """The same GPT with n_layers blocks; None for an MoE model whose blocks differ (dense ones first, or MoE
    only every few), which a shallower copy would not scale from."""
    moe = model.moe
    if moe.enabled and (moe.first_dense or moe.every != 1):
        return None
    return replace(model, n_layers=n_layers)


def after_step(model: GPT, dims: ParallelDims) -> dict[str, float]:
    """MoE: sum the experts' loads over the ranks that saw other tokens, move the auxiliary-loss-free routing
    biases, report the load; nothing for a dense model."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers and not dims.pp_enabled:  # a dense model (under pp, another stage may hold MoE layers)
        return {}
    # Every rank of a pipeline stage routed other tokens: the data-parallel ranks and, under sequence-parallel
    # TP, the tp ranks (each routes a slice of the sequence).
    groups = [dims.axis(axis).get_group() for axis in ("dp_cp", "tp") if dims.axis(axis).size() > 1]
    stage_group = dims.axis("pp").get_group() if dims.pp_enabled else None
    return update_balancing(layers, groups, stage_group)


def evaluate(model: GPT, cfg: JobConfig, dims: ParallelDims, step: int, logger: Any) -> dict[str, float]:
    """MoE: each block's per-expert load since the last evaluation as a heatmap (blocks x experts; PNG in
    <run>/moe_load/ and the logger's image moe/load) and the busiest expert's load over its block's mean;
    nothing for a dense model."""
    if not cfg.model.moe.enabled:
        return {}
    # Block index -> pairs per expert (the counts were summed over the ranks at each step's end).
    rows = {}
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            rows[int(name.split(".")[1])] = module.load_since_eval.cpu().clone()
            module.load_since_eval.zero_()
    if dims.pp_enabled:  # each stage holds other blocks
        parts: list[dict] = [{} for _ in range(dims.pp)]
        dist.all_gather_object(parts, rows, group=dims.axis("pp").get_group())
        rows = {block: counts for part in parts for block, counts in part.items()}
    if (dist.get_rank() if dist.is_initialized() else 0) != 0 or not rows:
        return {}
    from PIL import Image  # installed with tensorboard

    image = load_heatmap(rows).numpy()
    png = Path(cfg.job.run_dir) / cfg.job.name / "moe_load" / f"step-{step:08d}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(png)
    logger.log_image(step, "moe/load", image)
    counts_LE = torch.stack(list(rows.values())).float()
    return {"moe_max_load": float(relative_load(counts_LE).max())}


def attention_choice(cfg: JobConfig) -> ops.AttentionChoice:
    """model.attention resolved for this process's device (the trainer uses CUDA whenever it is present)."""
    return ops.resolve_attention(
        cfg.model.attention,
        device_type=training_device_type(),
        dtype=TORCH_DTYPES[cfg.train.dtype],
        head_dim=cfg.model.head_size,
        seq_len=cfg.data.seq_len,
    )


def _kernel_notes(cfg: JobConfig, dims: ParallelDims, choice: ops.AttentionChoice) -> list[str]:
    m = cfg.model
    attention = choice.describe(m.attention)
    if m.sliding_window:
        attention += f", sliding window {m.sliding_window}"
    if dims.cp_enabled:
        ring_blocks = f" over {'Triton' if choice.impl == 'triton' else 'eager'} blocks"
        attention += f", replaced by context-parallel {cfg.parallel.cp_method} attention"
        attention += ring_blocks if cfg.parallel.cp_method == "ring" else ""
    fused = {"norm": m.fused_norm, "rope": m.fused_rope, "swiglu": m.fused_swiglu}
    fused["cross_entropy"] = cfg.train.fused_cross_entropy
    on = [name for name, flag in fused.items() if flag]
    line = f"kernels: attention {attention} | fused: {', '.join(on) or 'none'}"
    if on or choice.impl == "triton":
        device = torch.device(training_device_type())
        line += f" ({ops.fused_backend(torch.empty(0, device=device))})"
    return [line]


def parallelize(model: GPT, dims: ParallelDims, cfg: JobConfig) -> GPT:
    model.fused_cross_entropy = cfg.train.fused_cross_entropy
    # Resolve model.attention (e.g. auto) once, here, and install the concrete implementation, so every
    # block and every rank runs the same one; context parallel may replace it afterwards (its ring reuses
    # the Triton kernel when that is the choice).
    choice = attention_choice(cfg)
    for block in model.layers.values():
        block.attention.attention_fn = ops.attention_fn(choice.impl, causal=True, window=cfg.model.sliding_window)
    return parallelize_gpt(model, dims, cfg, attention_impl=choice.impl)


def startup_notes(model: GPT, cfg: JobConfig, dims: ParallelDims) -> list[str]:
    return _kernel_notes(cfg, dims, attention_choice(cfg))


def _validate_moe(cfg: JobConfig, dims: ParallelDims) -> None:
    m, moe = cfg.model, cfg.model.moe
    for name in ("num_experts", "num_shared_experts", "expert_hidden", "first_dense", "groups", "topk_groups"):
        if getattr(moe, name) < 0:
            raise ValueError(f"model.moe.{name}: {getattr(moe, name)} is not allowed; use >= 0")
    for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
        if getattr(moe, name) < 0:
            raise ValueError(f"model.moe.{name}: {getattr(moe, name)} is not allowed; use 0 (off) or > 0")
    moe_blocks = [i for i in range(m.n_layers) if moe.is_moe_block(i)]
    checks = [
        (
            1 <= moe.top_k <= moe.num_experts,
            f"model.moe.top_k: {moe.top_k} must be in [1, num_experts={moe.num_experts}]",
        ),
        (moe.every >= 1, f"model.moe.every: {moe.every} is not allowed; use >= 1"),
        (
            moe.capacity_factor >= 0,
            f"model.moe.capacity_factor: {moe.capacity_factor} is not allowed; use 0 (dropless) or > 0",
        ),
        (bool(moe_blocks), f"model.moe.first_dense: {moe.first_dense} leaves no MoE block in {m.n_layers} layers"),
        (m.mlp == "swiglu", f"model.mlp: the experts are SwiGLU MLPs; MoE needs mlp=swiglu (got {m.mlp})"),
        (
            moe.num_experts % dims.ep == 0,
            f"parallel.ep: {dims.ep} does not divide model.moe.num_experts={moe.num_experts}; each ep rank holds "
            f"num_experts / ep experts (allowed: {', '.join(map(str, divisors(moe.num_experts)))})",
        ),
        (
            dims.pp == 1 or (moe.aux_loss_coef == 0 and moe.z_loss_coef == 0),
            "model.moe.aux_loss_coef: the balancing losses of earlier pipeline stages cannot reach the last "
            f"stage's loss (parallel.pp={dims.pp}); set aux_loss_coef=0 and z_loss_coef=0 and balance with "
            "bias_update_rate > 0",
        ),
    ]
    if moe.groups:
        checks += [
            (
                moe.num_experts % moe.groups == 0,
                f"model.moe.groups: {moe.groups} does not divide num_experts={moe.num_experts}",
            ),
            (
                1 <= moe.topk_groups <= moe.groups,
                f"model.moe.topk_groups: {moe.topk_groups} must be in [1, groups={moe.groups}]",
            ),
            (
                moe.top_k <= moe.topk_groups * (moe.num_experts // moe.groups),
                f"model.moe.top_k: {moe.top_k} is more than the {moe.topk_groups} kept groups hold "
                f"({moe.topk_groups * (moe.num_experts // moe.groups)} experts)",
            ),
        ]
    check_all(checks)


def validate(cfg: JobConfig, dims: ParallelDims) -> None:
    m, d = cfg.model, cfg.data
    # Sizes first: the checks below divide by them.
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "multiple_of"):
        if getattr(m, name) < 1:
            raise ValueError(f"model.{name}: {getattr(m, name)} is not allowed; use >= 1")
    for name in ("n_kv_heads", "ffn_hidden"):
        if getattr(m, name) < 0:
            raise ValueError(f"model.{name}: {getattr(m, name)} is not allowed; use 0 (automatic) or >= 1")
    if m.ffn_multiplier <= 0:
        raise ValueError(f"model.ffn_multiplier: {m.ffn_multiplier} is not allowed; use > 0")
    checks = [
        (m.head_dim >= 0, f"model.head_dim: {m.head_dim} is not allowed; use 0 (dim / n_heads) or >= 1"),
        (
            m.head_dim or m.dim % m.n_heads == 0,
            f"model.dim: {m.dim} is not divisible by model.n_heads={m.n_heads} (or set model.head_dim)",
        ),
        (m.head_size % 2 == 0 or m.pos != "rope", f"model.head_dim: the head width {m.head_size} must be even (RoPE)"),
        (m.n_heads % m.kv_heads == 0, f"model.n_kv_heads: {m.kv_heads} does not divide model.n_heads={m.n_heads}"),
        (d.seq_len >= 1, f"data.seq_len: {d.seq_len} is not allowed; use >= 1"),
        (d.seq_len <= m.max_seq_len, f"data.seq_len: {d.seq_len} exceeds model.max_seq_len={m.max_seq_len}"),
        (d.num_workers >= 0, f"data.num_workers: {d.num_workers} is not allowed; use >= 0"),
        (
            m.attention != "triton" or ops.triton_attention_supports(m.head_size),
            f"model.attention: 'triton' needs a head dim (model.head_dim, or dim/n_heads = {m.head_size}) that is "
            "a power of two in [16, 128]; use 'sdpa'",
        ),
        (
            m.attention != "flex" or ops.flex_available(),
            f"model.attention: 'flex' needs torch.nn.attention.flex_attention (torch {torch.__version__} lacks it)",
        ),
        (not m.fused_rope or m.pos == "rope", f"model.fused_rope: needs model.pos=rope, not {m.pos}"),
        (m.sliding_window >= 0, f"model.sliding_window: {m.sliding_window} is not allowed; use 0 (off) or >= 1"),
        (not m.fused_swiglu or m.mlp == "swiglu", f"model.fused_swiglu: needs model.mlp=swiglu, not {m.mlp}"),
    ]
    tp = dims.tp
    if tp > 1:
        checks += [
            (m.n_heads % tp == 0, f"parallel.tp: {tp} does not divide model.n_heads={m.n_heads}"),
            (m.kv_heads % tp == 0, f"parallel.tp: {tp} does not divide the kv heads (model.n_kv_heads={m.kv_heads})"),
            (m.hidden_dim % tp == 0, f"parallel.tp: {tp} does not divide the MLP hidden width {m.hidden_dim}"),
            (m.vocab_size % tp == 0, f"parallel.tp: {tp} does not divide model.vocab_size={m.vocab_size}"),
            (
                d.seq_len % tp == 0,
                f"data.seq_len: {d.seq_len} is not divisible by parallel.tp={tp} (sequence parallel)",
            ),
            (not m.tie_embeddings, "model.tie_embeddings: tied embeddings are not supported with tensor parallel"),
        ]
    if dims.pp > 1:
        checks.append(
            (not m.tie_embeddings, "model.tie_embeddings: tied embeddings are not supported with pipeline parallel")
        )
    if dims.cp > 1:
        local_heads = m.n_heads // tp
        checks += [
            (
                not m.sliding_window,
                f"model.sliding_window: {m.sliding_window} is not supported with context parallel (parallel.cp="
                f"{dims.cp}): the ring and all-to-all attention are full causal; use cp=1",
            ),
            (
                d.seq_len % (2 * dims.cp * tp) == 0 if tp > 1 else d.seq_len % (2 * dims.cp) == 0,
                f"data.seq_len: {d.seq_len} is not divisible by 2*cp{'*tp' if tp > 1 else ''} = "
                f"{2 * dims.cp * max(tp, 1)} (load-balanced context parallel)",
            ),
            (
                cfg.parallel.cp_method != "alltoall" or local_heads % dims.cp == 0,
                f"parallel.cp_method: alltoall needs the heads per tp rank ({local_heads}) divisible by cp={dims.cp}",
            ),
        ]
    check_all(checks)
    if m.moe.enabled or m.moe.num_experts < 0:
        _validate_moe(cfg, dims)
    elif dims.ep > 1:
        raise ValueError(
            f"parallel.ep: {dims.ep} needs routed experts to split, and model.moe.num_experts is 0 (a dense "
            "model); set model.moe.num_experts or use ep=1"
        )
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > m.vocab_size:
        raise ValueError(
            f"model.vocab_size: {m.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size})"
        )
    # Last: the data file may live on the cluster only (see MissingDataError).
    if cfg.data.path != "bundled":
        from pathlib import Path

        path = Path(cfg.data.path)
        if path.is_dir():
            raise ValueError(
                f"data.path: {cfg.data.path!r} is a folder; give a text file (.txt) or a token-id file (.bin/.npy)"
            )
        if not path.is_file():
            raise MissingDataError(f"data.path: {cfg.data.path!r} does not exist")


RECIPE = register_recipe(
    Recipe(
        name="gpt",
        model=ModelSpec(
            config=GPTConfig,
            build=GPT,
            parallelize=parallelize,
            startup_notes=startup_notes,
            active_parameters=active_parameters,
            expert_routing=lambda m: (sum(m.moe.is_moe_block(i) for i in range(m.n_layers)), m.moe.top_k),
        ),
        data=DataSpec(
            config=TextDataConfig,
            build_dataset=build_dataset,
            unit="tokens",
            units_per_sample=lambda cfg: cfg.data.seq_len,
            example_batch=example_batch,
        ),
        step=StepSpec(model_inputs=model_inputs, loss=loss, after_step=after_step),
        validate=validate,
        supports=ParallelSupport(
            tensor_parallel=True,
            loss_parallel=True,
            expert_parallel=True,
            fused_cross_entropy=True,
            pipeline=PipelineSpec(
                trunk="layers",
                first=("tok_embeddings", "pos_embeddings"),
                last=("norm", "output"),
                target_key="target",
                target_kwarg="targets",  # train.fused_cross_entropy: the last stage returns the loss
                with_trunk_depth=with_depth,
            ),
            context_parallel_keys=("input", "target"),
        ),
        evaluation=EvalSpec(evaluate=evaluate, evaluate_under_pipeline=True, bench_baselines=bench_baselines),
        hf=HFInterop(export=hf.export_hf, import_=hf.import_hf, model_types=hf.HF_MODEL_TYPES),
        megatron=MegatronInterop(
            refusals=megatron.megatron_refusals,
            arguments=megatron.megatron_arguments,
            build=megatron.build_megatron_gpt,
            to_megatron=megatron.to_megatron,
            from_megatron=megatron.from_megatron,
        ),
    )
)

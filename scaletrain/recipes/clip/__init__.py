"""CLIP recipe: a ViT image encoder and a transformer text encoder trained contrastively on the bundled shapes,
each captioned from its own random draws ("a photo of a small red circle at the top left", captions.py).

The contrastive loss uses the whole global batch as negatives on every layout (model.contrastive_loss: the
embeddings are all-gathered over the data-parallel ranks with gradients). Gradient accumulation is refused:
micro-batches would each see only their own negatives, a different loss (docs/clip.md).
Evaluation: zero-shot shape classification and image <-> caption recall@1/5 on held-out items.

  scaletrain train scaletrain/recipes/clip/configs/clip-tiny.yaml
  scaletrain sample runs/clip-tiny/checkpoints/step-00000600 --n 300
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from scaletrain.config.schema import JobConfig
from scaletrain.images.datasets import SHAPES, ImageDataConfig, ShapesDataset
from scaletrain.parallel import ParallelDims, checkpoint_compile_and_shard
from scaletrain.parallel.batching import grad_accum_steps
from scaletrain.parallel.dims import divisors
from scaletrain.recipes.clip.captions import CAPTION_TEMPLATE, CAPTION_TOKENS, EOT_ID, WordTokenizer, shape_attributes
from scaletrain.recipes.clip.evaluate import evaluate, sample
from scaletrain.recipes.clip.model import CLIP, MAX_LOGIT_SCALE, CLIPConfig
from scaletrain.registry import DataSpec, EvalSpec, ModelSpec, ParallelSupport, Recipe, StepSpec, register_recipe
from scaletrain.validate import check_all


class CaptionedShapes:
    """item i = {image, tokens, label}: shapes item i and its caption's tokens, a pure function of (seed, i)."""

    def __init__(self, cfg: JobConfig):
        m, d = cfg.model, cfg.data
        self.shapes = ShapesDataset(d.num_samples, m.image_size, m.num_classes, seed=d.shapes_seed)
        self.tokenizer = WordTokenizer(m.context_length)
        self.seed, self.image_size, self.num_classes = d.shapes_seed, m.image_size, m.num_classes

    def __len__(self) -> int:
        return len(self.shapes)

    def caption(self, i: int) -> str:
        return shape_attributes(i, self.seed, self.image_size, self.num_classes).caption()

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.shapes[int(i)]
        return {"image": item["image"], "tokens": self.tokenizer.encode(self.caption(int(i))), "label": item["label"]}


def build_dataset(cfg: JobConfig) -> CaptionedShapes:
    return CaptionedShapes(cfg)


def model_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["image"], batch["tokens"]


def example_batch(cfg: JobConfig, batch_size: int) -> dict[str, torch.Tensor]:
    m = cfg.model
    tokens = torch.zeros(batch_size, m.context_length, dtype=torch.int64)
    tokens[:, CAPTION_TOKENS - 1] = EOT_ID  # one <eot> per row, where the pooling reads
    return {
        "image": torch.empty(batch_size, m.in_channels, m.image_size, m.image_size, device="meta"),
        "tokens": tokens.to("meta"),
    }


def loss(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return output  # CLIP.forward returns this rank's share of the global-batch contrastive loss


def _replicated_input(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    return tuple(DTensor.from_local(x, mesh, [Replicate()]) for x in inputs)


def _local_output(module: nn.Module, output: DTensor, mesh: DeviceMesh) -> torch.Tensor:
    return output.to_local()


def apply_tensor_parallel(model: CLIP, dims: ParallelDims) -> None:
    """Megatron's split of every block: q/k/v and the MLP's first layer column-wise (each tp rank owns a slice of
    the heads / hidden units), the attention output and the MLP's second layer row-wise (their partial sums
    all-reduced once per sub-block). Every other parameter (embeddings, norms, the towers' projections, the
    temperature) is replicated over tp as a DTensor, so that all parameters live on the tp mesh (one optimizer
    and FSDP see one layout): every tp rank sees the same batch, so their values and gradients agree there.
    Layers compute on plain tensors (inputs wrapped as replicated, outputs unwrapped); the bare parameters
    are read through model.py's local()."""
    tp_mesh = dims.axis("tp")
    plan = {"attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(), "mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel()}  # fmt: skip
    for block in model.blocks():
        parallelize_module(block, tp_mesh, plan)
    for module in list(model.modules()):
        plain = [(n, p) for n, p in module.named_parameters(recurse=False) if not isinstance(p, DTensor)]
        if not plain:
            continue
        if isinstance(module, (nn.LayerNorm, nn.Linear, nn.Conv2d, nn.Embedding)):
            distribute_module(module, tp_mesh, input_fn=_replicated_input, output_fn=_local_output)
        else:  # the class token, positions, temperature
            for name, param in plain:
                module.register_parameter(name, nn.Parameter(distribute_tensor(param, tp_mesh, [Replicate()])))


def parallelize(model: CLIP, dims: ParallelDims, cfg: JobConfig) -> CLIP:
    """TP -> activation checkpointing -> compile -> FSDP2/HSDP/DDP (a unit per block, per tower and the root);
    the loss gathers the embeddings over the data-parallel ranks (dims.axis("dp"): replicate x shard)."""
    if dims.tp_enabled:
        apply_tensor_parallel(model, dims)
    blocks = model.blocks()
    # The towers are FSDP units of their own: evaluation embeds images and captions in separate calls.
    checkpoint_compile_and_shard(model, blocks, dims, cfg, extra_units=[model.visual, model.text])
    model.contrastive_group = dims.axis("dp").get_group() if dims.dp_size > 1 else None
    return model


def after_step(model: nn.Module, dims: ParallelDims) -> dict[str, float]:
    """The temperature's inverse as the logits see it (exp of the clamped logit scale)."""
    value = model.logit_scale.detach()
    if isinstance(value, DTensor):  # FSDP2 shards it; every rank calls this, so the gather is matched
        value = value.full_tensor()
    return {"logit_scale": value.float().clamp(max=MAX_LOGIT_SCALE).exp().item()}


def validate(cfg: JobConfig, dims: ParallelDims) -> None:
    m, d, t = cfg.model, cfg.data, cfg.train
    accum = grad_accum_steps(cfg, dims)
    example = CAPTION_TEMPLATE.split()
    check_all(
        [
            (d.source == "shapes",
             f"data.source: {d.source!r} is not supported by recipe 'clip': its captions are generated from the "
             "shapes' own draws; use shapes"),
            (2 <= m.num_classes <= len(SHAPES),
             f"model.num_classes: {m.num_classes} is not allowed; use 2..{len(SHAPES)} (the shapes' classes)"),
            (m.in_channels == 3, f"model.in_channels: {m.in_channels} is not allowed; the shapes are RGB: use 3"),
            (m.patch_size >= 1 and m.image_size % m.patch_size == 0,
             f"model.image_size: {m.image_size} is not divisible by model.patch_size={m.patch_size}; use a "
             "multiple of the patch size"),
            *((width >= 1 and heads >= 1 and width % heads == 0,
               f"model.{tower}_width: {width} is not divisible by model.{tower}_heads={heads}; use a multiple of "
               "the head count") for tower, width, heads in (("vision", m.vision_width, m.vision_heads),
                                                              ("text", m.text_width, m.text_heads))),
            *((heads % dims.tp == 0,
               f"model.{tower}_heads: {heads} is not divisible by parallel.tp={dims.tp} (tensor parallel splits the "
               f"heads); use tp in {divisors(heads)}") for tower, heads in (("vision", m.vision_heads),
                                                                         ("text", m.text_heads))),
            (m.vision_layers >= 1 and m.text_layers >= 1,
             f"model.vision_layers / model.text_layers: {m.vision_layers} / {m.text_layers} are not allowed; use >= 1"),
            (m.context_length >= CAPTION_TOKENS,
             f"model.context_length: {m.context_length} is too short for the captions ({len(example)} words + "
             f"<sot> and <eot> = {CAPTION_TOKENS} tokens, e.g. '{CAPTION_TEMPLATE}'); use >= {CAPTION_TOKENS}"),
            (m.embed_dim >= 1 and m.mlp_ratio >= 1,
             f"model.embed_dim / model.mlp_ratio: {m.embed_dim} / {m.mlp_ratio} are not allowed; use >= 1"),
            (0 < m.init_temperature <= 1,
             f"model.init_temperature: {m.init_temperature} is not allowed; use a value in (0, 1] (the paper: 0.07)"),
            (accum == 1,
             f"train.micro_batch_size: {t.micro_batch_size} makes {accum} accumulation steps; CLIP's contrastive loss "
             "takes every sample of the global batch as a negative in one forward, which accumulation would cut "
             "into micro-batches (a different loss); use 0 (= global_batch_size / dp = "
             f"{t.global_batch_size // dims.dp_size}), with a smaller global batch or more data-parallel ranks"),
            (not cfg.eval.interval or cfg.eval.num_samples >= 5,
             f"eval.num_samples: {cfg.eval.num_samples} is not allowed for CLIP's recall@5; use >= 5"),
        ]
    )  # fmt: skip


register_recipe(
    Recipe(
        name="clip",
        model=ModelSpec(config=CLIPConfig, build=CLIP, parallelize=parallelize),
        data=DataSpec(config=ImageDataConfig, build_dataset=build_dataset, example_batch=example_batch),
        step=StepSpec(model_inputs=model_inputs, loss=loss, after_step=after_step),
        validate=validate,
        supports=ParallelSupport(tensor_parallel=True),
        evaluation=EvalSpec(evaluate=evaluate, sample=sample),
    )
)

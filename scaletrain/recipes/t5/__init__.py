"""T5 recipe: an encoder-decoder trained on span corruption or a procedural sequence-to-sequence task.

The loss is each sample's mean cross-entropy over its target tokens (eos included, padding not), averaged
over the samples: a per-sample quantity, so every data-parallel layout and accumulation averages the same
numbers. Evaluation decodes held-out examples greedily and reports exact match and BLEU (sacrebleu).

  scaletrain train scaletrain/recipes/t5/configs/t5-tiny.yaml
  scaletrain train scaletrain/recipes/t5/configs/t5-tiny.yaml --data.task span_corruption
  scaletrain sample runs/t5-tiny/checkpoints/step-00000400 --input "q b x" --beams 4
  scaletrain export runs/t5-tiny/checkpoints/step-00000400 --format hf
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scaletrain.checkpoint.loading import load_job_config, load_model
from scaletrain.config import MissingDataError
from scaletrain.config.schema import JobConfig
from scaletrain.data.loader import stack_dict_batch
from scaletrain.distributed import destroy_distributed, init_distributed
from scaletrain.parallel import ParallelDims
from scaletrain.recipes.t5 import hf
from scaletrain.recipes.t5.data import (
    IGNORE,
    T5DataConfig,
    build_dataset,
    check_lengths,
    heldout_dataset,
    vocab_check,
    vocab_for,
)
from scaletrain.recipes.t5.decoding import beam_search, greedy
from scaletrain.recipes.t5.model import T5, T5Config
from scaletrain.recipes.t5.parallelize import parallelize
from scaletrain.registry import (
    DataSpec,
    EvalSpec,
    HFInterop,
    ModelSpec,
    ParallelSupport,
    Recipe,
    StepSpec,
    register_recipe,
)
from scaletrain.validate import check_all


def model_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["input"], batch["decoder_input"]


def example_batch(cfg: JobConfig, batch_size: int) -> dict[str, torch.Tensor]:
    d = cfg.data
    tokens = {"input": d.input_len, "decoder_input": d.target_len, "target": d.target_len}
    return {k: torch.zeros(batch_size, n, dtype=torch.long, device="meta") for k, n in tokens.items()}


def loss(logits_BTV: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over samples of each sample's mean target-token cross-entropy (fp32 softmax)."""
    target_BT = batch["target"]
    ce_BT = F.cross_entropy(logits_BTV.float().transpose(1, 2), target_BT, ignore_index=IGNORE, reduction="none")
    return (ce_BT.sum(1) / (target_BT != IGNORE).sum(1)).mean()


def decode_batch(model: torch.nn.Module, cfg: JobConfig, items: list[dict[str, torch.Tensor]]) -> list[str]:
    vocab = vocab_for(cfg)
    device = next(model.parameters()).device
    input_BS = stack_dict_batch(items)["input"].to(device)
    ids_BT = greedy(model, input_BS, cfg.data.target_len, vocab.pad, vocab.eos)
    return [vocab.decode(row) for row in ids_BT.tolist()]


def reference(cfg: JobConfig, item: dict[str, torch.Tensor]) -> str:
    return vocab_for(cfg).decode([i for i in item["target"].tolist() if i != IGNORE])


@torch.no_grad()
def evaluate(model: torch.nn.Module, cfg: JobConfig, dims: ParallelDims, step: int, logger: Any) -> dict[str, float]:
    """Greedy decoding of eval.num_samples held-out examples (the same on every rank: no collective depends on
    the data, and every rank calls forward equally often) -> exact match (fraction) and corpus BLEU."""
    import sacrebleu

    data = heldout_dataset(cfg, cfg.eval.num_samples)
    n = min(cfg.eval.num_samples, len(data))
    items = [data[i] for i in range(n)]
    hypotheses: list[str] = []
    for start in range(0, n, 64):
        hypotheses += decode_batch(model, cfg, items[start : start + 64])
    references = [reference(cfg, item) for item in items]
    exact = sum(h == r for h, r in zip(hypotheses, references, strict=True)) / n
    bleu = sacrebleu.corpus_bleu(hypotheses, [references]).score
    source = vocab_for(cfg).decode([i for i in items[0]["input"].tolist()])
    logger.log_text(f"eval step {step}: {source!r} -> {hypotheses[0]!r} (reference {references[0]!r})")
    return {"exact_match": exact, "bleu": bleu}


def sample(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="scaletrain sample", description="Decode inputs with a T5 checkpoint.")
    p.add_argument("checkpoint", help="a checkpoint folder (runs/<name>/checkpoints/step-XXXXXXXX)")
    p.add_argument("--input", action="append", required=True, help="input text (repeat for several)")
    p.add_argument("--beams", type=int, default=1, help="beam width; 1 = greedy")
    p.add_argument("--max-len", type=int, default=0, help="most output tokens; 0 = data.target_len")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log p / length**this")
    p.add_argument("--ema", choices=["auto", "yes", "no"], default="auto", help="use the EMA weights if present")
    p.add_argument("--config", default=None, help="training config YAML, when the checkpoint does not carry one")
    args, overrides = p.parse_known_args(argv)
    if args.beams < 1:
        raise ValueError(f"--beams: {args.beams} is not allowed; use >= 1")
    if args.max_len < 0:
        raise ValueError(f"--max-len: {args.max_len} is not allowed; use 0 (data.target_len) or >= 1")
    folder = Path(args.checkpoint)
    cfg = load_job_config(folder, "t5", args.config, overrides)
    vocab = vocab_for(cfg)
    inputs = [vocab.encode(text) + [vocab.eos] for text in args.input]
    too_long = [text for text, ids in zip(args.input, inputs, strict=True) if len(ids) > cfg.data.input_len]
    if too_long:
        raise ValueError(f"--input: {too_long[0]!r} takes more than data.input_len={cfg.data.input_len} tokens")
    max_len = args.max_len or cfg.data.target_len
    init_distributed("auto")
    try:
        model = load_model(folder, "t5", cfg, args.ema)
        device = next(model.parameters()).device
        for text, ids in zip(args.input, inputs, strict=True):
            input_1S = torch.tensor([ids], device=device)
            if args.beams == 1:
                out = greedy(model, input_1S, max_len, vocab.pad, vocab.eos)[0].tolist()
            else:
                out = beam_search(model, input_1S, args.beams, max_len, vocab.pad, vocab.eos, args.length_penalty)
            print(vocab.decode(out) if len(args.input) == 1 else f"{text}\t{vocab.decode(out)}")
    finally:
        destroy_distributed()


def validate(cfg: JobConfig, dims: ParallelDims) -> None:
    m, d = cfg.model, cfg.data
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "ffn_hidden"):
        if getattr(m, name) < 1:
            raise ValueError(f"model.{name}: {getattr(m, name)} is not allowed; use >= 1")
    checks = [
        (m.n_decoder_layers >= 0,
         f"model.n_decoder_layers: {m.n_decoder_layers} is not allowed; use 0 (= n_layers) or >= 1"),
        (m.num_buckets >= 4, f"model.num_buckets: {m.num_buckets} is not allowed; use >= 4"),
        (m.max_distance > m.num_buckets // 2,
         f"model.max_distance: {m.max_distance} is not allowed; use > num_buckets / 2 = {m.num_buckets // 2} (the "
         "logarithmic buckets span the distances between them)"),
        (m.norm_eps > 0, f"model.norm_eps: {m.norm_eps} is not allowed; use > 0"),
    ]  # fmt: skip
    tp = dims.tp
    if tp > 1:
        checks += [
            (m.n_heads % tp == 0, f"parallel.tp: {tp} does not divide model.n_heads={m.n_heads}"),
            (m.ffn_hidden % tp == 0, f"parallel.tp: {tp} does not divide model.ffn_hidden={m.ffn_hidden}"),
            (m.tie_embeddings or m.vocab_size % tp == 0,
             f"parallel.tp: {tp} does not divide model.vocab_size={m.vocab_size} (the untied lm_head is split over "
             "the vocabulary)"),
        ]  # fmt: skip
    checks += check_lengths(d)
    check_all(checks)
    vocab = vocab_for(cfg)
    check_all(
        [
            vocab_check(cfg),
            (m.pad_id == vocab.pad,
             f"model.pad_id: {m.pad_id} is not the data's pad id; use {vocab.pad} (the tokenizer's vocabulary size)"),
        ]
    )  # fmt: skip
    if d.task == "span_corruption" and d.path != "bundled":
        path = Path(d.path)
        if path.is_dir():
            raise ValueError(f"data.path: {d.path!r} is a folder; give a text file (.txt) or a token-id file")
        if not path.is_file():
            raise MissingDataError(f"data.path: {d.path!r} does not exist")


register_recipe(
    Recipe(
        name="t5",
        model=ModelSpec(config=T5Config, build=T5, parallelize=parallelize),
        data=DataSpec(
            config=T5DataConfig,
            build_dataset=build_dataset,
            unit="tokens",
            units_per_sample=lambda cfg: cfg.data.input_len + cfg.data.target_len,
            example_batch=example_batch,
        ),
        step=StepSpec(model_inputs=model_inputs, loss=loss),
        validate=validate,
        supports=ParallelSupport(tensor_parallel=True),
        evaluation=EvalSpec(evaluate=evaluate, sample=sample),
        hf=HFInterop(export=hf.export_hf, import_=hf.import_hf, model_types=("t5",)),
    )
)

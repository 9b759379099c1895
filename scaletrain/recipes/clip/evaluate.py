"""CLIP's evaluation on held-out shapes: zero-shot classification and image <-> caption retrieval.

Held-out items are the procedural shapes after data.num_samples (the training never reads them).
  zero-shot:  each image goes to the class whose prompt embedding is nearest. Two prompt sets: CLIP's
              "a photo of a {shape}", and the caption template's ensemble (Radford et al. 2021, sec. 3.1.4):
              the mean normalized embedding of every caption the template makes for that shape.
  retrieval:  recall@k of the N x N similarities, image -> caption and caption -> image. Several held-out
              items can share a caption (2 sizes x 6 colours x 4 positions per shape), so a retrieved
              caption (image) counts as a hit when its caption is the query's.

`scaletrain sample CKPT` prints the same on N held-out items, with the confusion matrix and a retrieval table.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scaletrain.checkpoint.loading import load_job_config, load_model
from scaletrain.config.schema import JobConfig
from scaletrain.distributed import destroy_distributed, init_distributed
from scaletrain.images.datasets import SHAPES, ShapesDataset
from scaletrain.recipes.clip.captions import PHOTO_PROMPT, WordTokenizer, every_caption, shape_attributes

CHUNK = 256  # items per forward


@dataclass
class HeldOut:
    images: torch.Tensor  # (n, C, H, W)
    labels: torch.Tensor  # (n,)
    captions: list[str]


def held_out(cfg: JobConfig, n: int, start: int | None = None) -> HeldOut:
    m, d = cfg.model, cfg.data
    start = d.num_samples if start is None else start
    shapes = ShapesDataset(start + n, m.image_size, m.num_classes, seed=d.shapes_seed)
    indices = range(start, start + n)
    items = [shapes[i] for i in indices]
    return HeldOut(
        images=torch.stack([item["image"] for item in items]),
        labels=torch.stack([item["label"] for item in items]),
        captions=[shape_attributes(i, d.shapes_seed, m.image_size, m.num_classes).caption() for i in indices],
    )


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Normalized embeddings of images or token rows, in chunks, through the root forward (every rank calls it
    with the same inputs, so sharded layouts gather their weights alike)."""
    device = next(model.parameters()).device
    inputs = images if images is not None else tokens
    out = []
    for chunk in inputs.split(CHUNK):
        pair = (chunk.to(device), None) if images is not None else (None, chunk.to(device))
        out.append(model(*pair, mode="embed")[0 if images is not None else 1].float().cpu())
    return torch.cat(out)


def class_embeddings(model: nn.Module, cfg: JobConfig, prompt: str | None) -> torch.Tensor:
    """(classes, E): one prompt per class, or (prompt None) the caption template's ensemble."""
    m = cfg.model
    tokenizer = WordTokenizer(m.context_length)
    rows = []
    for shape in SHAPES[: m.num_classes]:
        texts = [prompt.format(shape=shape)] if prompt is not None else every_caption(shape)
        rows.append(torch.nn.functional.normalize(embed(model, tokens=tokenizer.encode_all(texts)).mean(0), dim=0))
    return torch.stack(rows)


def recall_at(similarity_QK: torch.Tensor, same_QK: torch.Tensor, k: int) -> float:
    """Fraction of queries (rows) whose top-k keys include one that matches (same_QK)."""
    top = similarity_QK.topk(min(k, similarity_QK.shape[1]), dim=1).indices
    return same_QK.gather(1, top).any(dim=1).float().mean().item()


def score(model: nn.Module, cfg: JobConfig, data: HeldOut) -> dict[str, Any]:
    """Zero-shot accuracies (and the ensemble's predictions) and retrieval recalls on held-out items."""
    image_NE = embed(model, images=data.images)
    text_NE = embed(model, tokens=WordTokenizer(cfg.model.context_length).encode_all(data.captions))
    ensemble_pred = (image_NE @ class_embeddings(model, cfg, None).T).argmax(1)
    photo_pred = (image_NE @ class_embeddings(model, cfg, PHOTO_PROMPT).T).argmax(1)
    similarity = image_NE @ text_NE.T
    same = torch.tensor([[a == b for b in data.captions] for a in data.captions])
    return {
        "zero_shot_acc": (ensemble_pred == data.labels).float().mean().item(),
        "zero_shot_acc_photo": (photo_pred == data.labels).float().mean().item(),
        "zero_shot_chance": 1 / cfg.model.num_classes,
        "image_to_text_r1": recall_at(similarity, same, 1),
        "image_to_text_r5": recall_at(similarity, same, 5),
        "text_to_image_r1": recall_at(similarity.T, same, 1),
        "text_to_image_r5": recall_at(similarity.T, same, 5),
        "predictions": ensemble_pred,
        "similarity": similarity,
    }


def evaluate(model: nn.Module, cfg: JobConfig, _dims: Any, _step: int, _logger: Any) -> dict[str, float]:
    """eval.num_samples held-out items; every rank computes the same (all of it: the sets are small)."""
    results = score(model, cfg, held_out(cfg, cfg.eval.num_samples))
    return {k: v for k, v in results.items() if isinstance(v, float)}


def confusion_table(labels: torch.Tensor, predictions: torch.Tensor, classes: list[str]) -> str:
    counts = torch.zeros(len(classes), len(classes), dtype=torch.int64)
    counts.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    width = max(len(c) for c in classes) + 1
    lines = ["true \\ predicted".ljust(width + 2) + "".join(c[:8].rjust(9) for c in classes) + "   recall"]
    for i, name in enumerate(classes):
        recall = counts[i, i].item() / max(1, counts[i].sum().item())
        lines.append(name.ljust(width + 2) + "".join(f"{v:9d}" for v in counts[i].tolist()) + f"   {recall:6.1%}")
    return "\n".join(lines)


def sample(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        prog="scaletrain sample", description="Zero-shot classification and retrieval of a CLIP checkpoint."
    )
    p.add_argument("checkpoint", help="a checkpoint folder (runs/<name>/checkpoints/step-XXXXXXXX)")
    p.add_argument("--n", type=int, default=200, help="held-out items to score")
    p.add_argument("--start", type=int, default=None, help="first item (default: data.num_samples, held out)")
    p.add_argument("--show", type=int, default=10, help="rows of the retrieval table to print")
    p.add_argument("--ema", choices=["auto", "yes", "no"], default="auto", help="use the EMA weights if present")
    p.add_argument("--config", default=None, help="training config YAML, when the checkpoint does not carry one")
    args, overrides = p.parse_known_args(argv)
    if args.n < 5:
        raise ValueError(f"--n: {args.n} is not allowed; use >= 5 (recall@5 needs 5 items)")
    folder = Path(args.checkpoint)
    cfg = load_job_config(folder, "clip", args.config, overrides)
    data = held_out(cfg, args.n, args.start)
    init_distributed("auto")
    try:
        results = score(load_model(folder, "clip", cfg, args.ema), cfg, data)
    finally:
        destroy_distributed()
    classes = list(SHAPES[: cfg.model.num_classes])
    start = cfg.data.num_samples if args.start is None else args.start
    print(f"{args.n} held-out items from index {start}")
    print(f"zero-shot accuracy: {results['zero_shot_acc']:.1%} (caption-template ensemble), "
          f"{results['zero_shot_acc_photo']:.1%} ({PHOTO_PROMPT!r}); chance {1 / len(classes):.1%}")  # fmt: skip
    print(confusion_table(data.labels, results["predictions"], classes))
    print(f"retrieval recall@1/@5: image->text {results['image_to_text_r1']:.1%} / {results['image_to_text_r5']:.1%}, "
          f"text->image {results['text_to_image_r1']:.1%} / {results['text_to_image_r5']:.1%}")  # fmt: skip
    best = results["similarity"].argmax(1)
    print(f"\n{'item':>6}  {'caption':<54} top-1 retrieved caption")
    for row in range(min(args.show, args.n)):
        hit = "ok  " if data.captions[best[row]] == data.captions[row] else "MISS"
        print(f"{start + row:>6}  {data.captions[row]:<54} {hit} {data.captions[best[row]]}")

"""Captions for the bundled shapes, and the word-level tokenizer that reads them.

A shapes item is drawn by `render_shape` (scaletrain/images/datasets.py) from eight uniforms of a generator
seeded by ("shapes", seed, index). `shape_attributes` draws the same eight numbers from the same seed and
reads off what the picture shows:

  u[0] -> radius r = size * (0.22 + 0.12 u[0])          -> "small" (u[0] < 0.5) or "large"
  u[1], u[2] -> centre (cx, cy) inside a margin of r + 1 -> "top"/"bottom", "left"/"right" (image halves)
  u[3] -> foreground hue                                 -> one of six 60-degree hue bins, centred on the
                                                            primaries and secondaries ("red" spans 330-30)

so the caption of item i is "a photo of a small red circle at the top left": a pure function of
(seed, i), in agreement with the image (tests/clip/test_clip.py measures the centre, hue and area back
from the rendered pixels). The class is the shape, as in ShapesDataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scaletrain.images.datasets import SHAPES, seeded_generator

SIZES = ("small", "large")
COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")  # hue bins of 60 degrees from -30
VERTICAL = ("top", "bottom")
HORIZONTAL = ("left", "right")
CAPTION_TEMPLATE = "a photo of a {size} {colour} {shape} at the {vertical} {horizontal}"
PHOTO_PROMPT = "a photo of a {shape}"  # CLIP's zero-shot prompt

PAD, SOT, EOT = "<pad>", "<sot>", "<eot>"
WORDS = ("a", "photo", "of", "at", "the", *SIZES, *COLOURS, *SHAPES, *VERTICAL, *HORIZONTAL)
VOCAB = (PAD, SOT, EOT, *WORDS)
PAD_ID, SOT_ID, EOT_ID = 0, 1, 2
# Every caption has the template's words; <sot> and <eot> around them.
CAPTION_TOKENS = len(CAPTION_TEMPLATE.split()) + 2


@dataclass(frozen=True)
class ShapeAttributes:
    """What render_shape drew for one item (pixel units, image y grows downwards)."""

    shape: str
    radius: float
    cx: float
    cy: float
    hue: float  # in [0, 1)
    size: str
    colour: str
    vertical: str
    horizontal: str

    def caption(self, template: str = CAPTION_TEMPLATE) -> str:
        return template.format(shape=self.shape, size=self.size, colour=self.colour, vertical=self.vertical,
                               horizontal=self.horizontal)  # fmt: skip


def colour_name(hue: float) -> str:
    return COLOURS[int(((hue * 360 + 30) % 360) // 60)]


def shape_attributes(index: int, seed: int, image_size: int, num_classes: int) -> ShapeAttributes:
    """The draws of ShapesDataset(seed=seed)[index], in render_shape's order (its first eight uniforms)."""
    u = torch.rand(8, generator=seeded_generator("shapes", seed, int(index))).tolist()
    radius = image_size * (0.22 + 0.12 * u[0])
    margin = radius + 1.0
    cx = margin + (image_size - 2 * margin) * u[1]
    cy = margin + (image_size - 2 * margin) * u[2]
    return ShapeAttributes(
        shape=SHAPES[int(index) % num_classes],
        radius=radius,
        cx=cx,
        cy=cy,
        hue=u[3],
        size=SIZES[u[0] >= 0.5],
        colour=colour_name(u[3]),
        vertical=VERTICAL[cy >= image_size / 2],
        horizontal=HORIZONTAL[cx >= image_size / 2],
    )


def every_caption(shape: str) -> list[str]:
    """The template filled in every way for one shape: zero-shot's prompt ensemble for that class."""
    return [CAPTION_TEMPLATE.format(shape=shape, size=s, colour=c, vertical=v, horizontal=h)
            for s in SIZES for c in COLOURS for v in VERTICAL for h in HORIZONTAL]  # fmt: skip


class WordTokenizer:
    """Word-level over the captions' vocabulary: <sot> words <eot>, then <pad> up to the context length."""

    def __init__(self, context_length: int):
        self.context_length = context_length
        self.ids = {word: i for i, word in enumerate(VOCAB)}

    def encode(self, text: str) -> torch.Tensor:
        words = text.lower().split()
        unknown = [w for w in words if w not in self.ids or w in (PAD, SOT, EOT)]
        if unknown:
            raise ValueError(f"caption {text!r}: unknown words {unknown}; the vocabulary is {list(WORDS)}")
        if len(words) + 2 > self.context_length:
            raise ValueError(
                f"model.context_length: the caption {text!r} needs {len(words) + 2} tokens (with <sot> and <eot>), "
                f"more than model.context_length={self.context_length}; use >= {len(words) + 2}"
            )
        ids = [SOT_ID, *(self.ids[w] for w in words), EOT_ID]
        return torch.tensor(ids + [PAD_ID] * (self.context_length - len(ids)), dtype=torch.int64)

    def encode_all(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self.encode(t) for t in texts])

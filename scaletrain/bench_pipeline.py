"""Pipeline bubble: measured from per-microbatch timestamps, next to the schedule's theory.

Run under torchrun with pp > 1:
  torchrun --nproc-per-node 2 -m scaletrain.cli bench scaletrain/recipes/gpt/configs/tiny.yaml \
      --parallel.pp 2 --parallel.pp_schedule gpipe --parallel.microbatches 4 --parallel.dp_shard 1

Each stage's forward / backward (input grad) / weight-grad chunk is timestamped. A rank's
bubble is the part of the step window (first start to last end over all ranks) in which it
computes nothing; a step's bubble is the mean over ranks, and the report gives the best of
the measured steps (the least disturbed by other load on the machine) and their median. Theory, for p ranks, m
microbatches and V stages per rank: (p-1)/(m+p-1) for GPipe and 1F1B, divided by V for
interleaved 1F1B, about 0 for zero-bubble schedules. Communication counts as idle, so the
measurement is an upper bound that approaches theory as compute per microbatch grows.
A PNG timeline (ranks x time; forward, backward, weight-grad coloured) is written too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

COLOURS = {"F": (66, 133, 244), "B": (234, 67, 53), "W": (52, 168, 83)}


@dataclass
class Event:
    rank: int
    kind: str  # F, B or W
    stage: int
    microbatch: int
    start: float
    end: float


class TimelineRecorder:
    """Wraps a PipelineStage's chunk methods to record when each ran."""

    def __init__(self, stages, rank: int):
        self.rank, self.events = rank, []
        for stage in stages:
            self._wrap(stage, "forward_one_chunk", "F")
            self._wrap(stage, "backward_one_chunk", "B")
            self._wrap(stage, "backward_weight_one_chunk", "W")

    def _wrap(self, stage, method: str, kind: str) -> None:
        original = getattr(stage, method)

        def timed(*args, **kwargs):
            chunk_id = args[0] if args else next(iter(kwargs.values()))
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.events.append(Event(self.rank, kind, stage.stage_index, int(chunk_id), start, time.perf_counter()))

        setattr(stage, method, timed)

    def clear(self) -> None:
        self.events = []


def theoretical_bubble(schedule: str, pp: int, microbatches: int, stages_per_rank: int) -> float:
    if schedule in ("zero_bubble", "zbv", "dualpipev"):
        return 0.0
    base = (pp - 1) / (microbatches + pp - 1)
    return base / stages_per_rank if schedule == "interleaved_1f1b" else base


def measured_bubble(events: list[Event], num_ranks: int) -> float:
    start = min(e.start for e in events)
    window = max(e.end for e in events) - start
    idle = []
    for rank in range(num_ranks):
        busy = sum(e.end - e.start for e in events if e.rank == rank)
        idle.append(1.0 - busy / window)
    return sum(idle) / num_ranks


def gather_events(events: list[Event]) -> list[Event]:
    """All ranks' events on every rank (object all-gather over the default group)."""
    gathered: list[list[Event] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, events)
    return [e for rank_events in gathered for e in (rank_events or [])]


def draw_timeline(events: list[Event], num_ranks: int, path: Path, width: int = 1200, row: int = 40) -> Path:
    from PIL import Image, ImageDraw

    start = min(e.start for e in events)
    span = max(e.end for e in events) - start
    margin = 60
    image = Image.new("RGB", (width + margin + 10, num_ranks * row + 30), "white")
    draw = ImageDraw.Draw(image)
    for rank in range(num_ranks):
        draw.text((5, rank * row + row // 3), f"rank {rank}", fill="black")
    for e in events:
        x0 = margin + int((e.start - start) / span * width)
        x1 = max(x0 + 1, margin + int((e.end - start) / span * width))
        y0 = e.rank * row + 4
        draw.rectangle([x0, y0, x1, y0 + row - 8], fill=COLOURS[e.kind], outline="black")
        if x1 - x0 > 14:
            draw.text((x0 + 2, y0 + 8), f"{e.kind}{e.microbatch}", fill="white")
    legend_y = num_ranks * row + 10
    for i, (kind, colour) in enumerate(COLOURS.items()):
        draw.rectangle([margin + i * 160, legend_y, margin + i * 160 + 12, legend_y + 12], fill=colour)
        label = {"F": "forward", "B": "backward", "W": "weight grad"}[kind]
        draw.text((margin + i * 160 + 16, legend_y), label, fill="black")
    image.save(path)
    return path


@dataclass
class PipelineBenchResult:
    schedule: str
    pp: int
    microbatches: int
    stages_per_rank: int
    measured: float  # best (least disturbed) step: the usual estimate of the undisturbed value
    measured_median: float
    theory: float
    rate: float
    unit: str
    timeline_png: Path | None

    def report(self) -> str:
        return "\n".join(
            [
                f"pipeline {self.schedule}: pp={self.pp}, microbatches={self.microbatches}, "
                f"stages/rank={self.stages_per_rank} | {self.rate:.1f} {self.unit}/s",
                f"bubble: measured {100 * self.measured:.1f}% | theory {100 * self.theory:.1f}% "
                f"| difference {100 * (self.measured - self.theory):+.1f} points "
                f"(best step; median {100 * self.measured_median:.1f}%)",
                f"timeline: {self.timeline_png}",
            ]
        )

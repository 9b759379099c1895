"""Pipeline parallelism: split a meta-device model into stages and drive them with a schedule.

The recipe says how its model splits (`PipelineSpec`): a ModuleDict of repeated blocks
(the trunk), the modules that run before it (first stage only) and after it (last stage
only). Each stage is a deep copy of the meta model with the other stages' modules removed,
so parameter names stay those of the whole model — checkpoints load across pp degrees —
and no rank ever materializes more than its own stages.

Stage sizes: the pre- and post-trunk modules each count as one block (embedding lookups
are cheap but the head's vocab projection is not, and both hold large tables), and the
blocks plus those two units are cut into contiguous, near-equal pieces. An explicit list
of boundaries (`parallel.pp_layer_boundaries`) overrides that.

Schedules come from torch.distributed.pipelining; looped schedules (interleaved 1F1B,
interleaved zero-bubble) put stages r, r+pp, r+2pp, ... on rank r; V-shaped ones (ZBV,
DualPipeV) put stages r and 2pp-1-r on rank r.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from scaletrain.registry import PipelineSpec

# torch.distributed.pipelining pulls in dynamo (seconds per process start), so it is imported
# only when a pipeline is actually built.
SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zbv", "dualpipev")
_SCHEDULE_CLASSES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "zero_bubble": "ScheduleInterleavedZeroBubble",
    "zbv": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
}


def schedule_class(name: str) -> type:
    from torch.distributed.pipelining import schedules

    cls = getattr(schedules, _SCHEDULE_CLASSES.get(name, ""), None)
    if cls is None:
        available = [n for n in SCHEDULE_NAMES if hasattr(schedules, _SCHEDULE_CLASSES[n])]
        raise ValueError(f"parallel.pp_schedule: {name!r} is not available with this torch; use one of {available}")
    return cls


SINGLE_STAGE = ("gpipe", "1f1b")
V_SHAPED = ("zbv", "dualpipev")


def num_stages(pp: int, stages_per_rank: int) -> int:
    return pp * stages_per_rank


def split_layers(num_layers: int, stages: int, boundaries: list[int] | None = None) -> list[list[int]]:
    """Layer indices of each stage. Raises ValueError naming the field when it cannot split."""
    if boundaries:
        cuts = [0, *boundaries, num_layers]
        if len(boundaries) != stages - 1 or any(b <= a for a, b in zip(cuts, cuts[1:], strict=False)):
            raise ValueError(
                f"parallel.pp_layer_boundaries: {boundaries} must be {stages - 1} increasing layer indices "
                f"in (0, {num_layers}) for {stages} stages"
            )
        return [list(range(a, b)) for a, b in zip(cuts, cuts[1:], strict=False)]
    if num_layers < stages:
        raise ValueError(
            f"parallel.pp: {num_layers} layers cannot be split into {stages} pipeline stages "
            "(each stage needs at least one layer); lower pp or stages_per_rank"
        )
    # Units: [pre] + layers + [post], cut into near-equal contiguous runs.
    units = num_layers + 2
    sizes = [units // stages + (1 if s < units % stages else 0) for s in range(stages)]
    sizes[0] -= 1  # the first stage's first unit is the pre-trunk modules
    sizes[-1] -= 1  # the last stage's last unit is the post-trunk modules
    # A stage left with no layer (tiny models) borrows one from its fullest neighbour.
    for s in range(stages):
        if sizes[s] == 0:
            donor = max(range(stages), key=lambda i: sizes[i])
            sizes[donor] -= 1
            sizes[s] += 1
    out, start = [], 0
    for size in sizes:
        out.append(list(range(start, start + size)))
        start += size
    return out


def stage_ids_for_rank(pp_rank: int, pp: int, stages_per_rank: int, schedule: str) -> list[int]:
    if schedule in V_SHAPED:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + v * pp for v in range(stages_per_rank)]


def build_stage_module(model: nn.Module, spec: PipelineSpec, layers: list[int], stage: int, stages: int) -> nn.Module:
    """A copy of the (meta) model holding only `layers` of the trunk and its end modules."""
    part = copy.deepcopy(model)
    trunk: nn.ModuleDict = getattr(part, spec.trunk)
    keep = {str(i) for i in layers}
    for name in list(trunk.keys()):
        if name not in keep:
            del trunk[name]
    if stage != 0:
        for name in spec.first:
            setattr(part, name, None)
    if stage != stages - 1:
        for name in spec.last:
            setattr(part, name, None)
    return part


def stage_union(parts: list[nn.Module], spec: PipelineSpec) -> nn.Module:
    """One module over this rank's stages whose parameter names are the whole model's.

    With several stages per rank (interleaved, V-shaped schedules) a container of the stages
    would prefix every name with the stage's slot ("0.layers.3..."), which depends on the
    layout. Here the stages' own modules are attached under their original names instead
    (trunk blocks by their global index), so the optimizer, EMA, grad clipping and
    checkpoints see the same names as a one-process run and load across any pp degree.
    The modules are shared, not copied; the union has no forward (the schedule drives the
    stages).
    """
    union = nn.Module()
    trunk = nn.ModuleDict()
    for part in parts:
        for name, module in part.named_children():
            if name == spec.trunk:
                trunk.update(module)
            elif module is not None:
                union.add_module(name, module)
        for name, param in part.named_parameters(recurse=False):
            union.register_parameter(name, param)
        for name, buf in part.named_buffers(recurse=False):
            union.register_buffer(name, buf, persistent=name not in part._non_persistent_buffers_set)
    union.add_module(spec.trunk, trunk)
    return union


_inferring_shapes = False


def inferring_shapes() -> bool:
    """True while a pipeline stage runs a forward only to learn its output shapes (torch 2.13 runs it on
    the device, on uninitialized inputs): state that a forward updates besides its output, e.g. MoE expert
    load counts, must not count it."""
    return _inferring_shapes


@contextlib.contextmanager
def _shape_inference() -> Iterator[None]:
    global _inferring_shapes
    _inferring_shapes = True
    try:
        yield
    finally:
        _inferring_shapes = False


def _stage_class() -> type:
    from torch.distributed.pipelining import PipelineStage

    class Stage(PipelineStage):
        """torch's PipelineStage, with its metadata forward marked (see inferring_shapes). The method is
        private: torch 2.13 calls it _forward_metadata_inference, earlier releases _shape_inference."""

    for method in ("_forward_metadata_inference", "_shape_inference"):
        if hasattr(PipelineStage, method):
            original = getattr(PipelineStage, method)

            def marked(self, *args, _original=original, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
                with _shape_inference():
                    return _original(self, *args, **kwargs)

            setattr(Stage, method, marked)
    return Stage


def build_schedule(
    stage_modules: list[nn.Module],
    stage_ids: list[int],
    stages: int,
    device: torch.device,
    pp_group,
    schedule: str,
    microbatches: int,
    loss_fn,
):
    stage_class = _stage_class()
    pipeline_stages = [
        stage_class(module, stage_index=sid, num_stages=stages, device=device, group=pp_group)
        for module, sid in zip(stage_modules, stage_ids, strict=True)
    ]
    cls = schedule_class(schedule)
    if schedule in SINGLE_STAGE:
        return cls(pipeline_stages[0], n_microbatches=microbatches, loss_fn=loss_fn), pipeline_stages
    return cls(pipeline_stages, n_microbatches=microbatches, loss_fn=loss_fn), pipeline_stages


def validate_pipeline(
    schedule: str, pp: int, stages_per_rank: int, microbatches: int, local_batch: int, num_layers: int | None
) -> None:
    """Every pipeline config error, before launch."""
    if schedule not in SCHEDULE_NAMES or schedule == "dualpipev":
        schedule_class(schedule)  # raises, listing what this torch offers
    if schedule in SINGLE_STAGE and stages_per_rank != 1:
        raise ValueError(
            f"parallel.stages_per_rank: {schedule} runs one stage per rank; use 1 or an interleaved schedule"
        )
    if schedule in V_SHAPED and stages_per_rank != 2:
        raise ValueError(f"parallel.stages_per_rank: {schedule} needs exactly 2 stages per rank (V shape)")
    if microbatches < 1:
        raise ValueError(f"parallel.microbatches: {microbatches} is not allowed; use >= 1 (0 = pp)")
    if schedule == "1f1b" and microbatches < pp:
        raise ValueError(f"parallel.microbatches: 1F1B needs at least pp={pp} microbatches, got {microbatches}")
    if schedule not in SINGLE_STAGE and microbatches % pp:
        raise ValueError(
            f"parallel.microbatches: {schedule} needs a multiple of pp={pp} microbatches, got {microbatches}"
        )
    if local_batch % microbatches:
        raise ValueError(
            f"parallel.microbatches: the per-rank batch of {local_batch} samples is not divisible into "
            f"{microbatches} pipeline microbatches"
        )
    if num_layers is not None:
        split_layers(num_layers, num_stages(pp, stages_per_rank))

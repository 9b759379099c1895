"""Every pipeline rank's predicted memory for a layout: model state (shards.py + memory.py) and the activation
peak (simulate.py).

A deep model is sized from two shallow copies of itself. Both terms grow linearly with the blocks a rank holds
(each block adds its parameters, and its saved activations or checkpointed input, to every in-flight
microbatch), while what does not scale with depth (embeddings, the loss's logits, FSDP's prefetched block,
the recomputed block under full checkpointing) is the same in every copy. So the layout is simulated with 3
and then 4 blocks per pipeline stage (from 2 to 3 the peak was seen to move: the tiny GPT under full
checkpointing grew 6x more than from 3 on), and each rank's numbers are carried along the line through them to
the blocks it holds at full depth: two small simulations instead of one of the whole model (Llama-3-70B's
80 blocks: minutes each on a 2-core CPU, against seconds). Recipes opt in by saying how to change the depth
(PipelineSpec.with_trunk_depth); others, trunks of unlike blocks, hand-placed stage boundaries and models
barely deeper than the copies are simulated whole.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import asdict, dataclass, replace

from scaletrain.config.schema import JobConfig
from scaletrain.engines import get_engine
from scaletrain.parallel.dims import ParallelDims
from scaletrain.parallel.pipeline import num_stages, split_layers, stage_ids_for_rank
from scaletrain.plan.memory import FP32, ModelStateBytes, model_state_bytes
from scaletrain.plan.simulate import share_pipeline_input, simulate_rank
from scaletrain.registry import get_recipe

SHALLOW_BLOCKS_PER_STAGE = (3, 4)


@dataclass(frozen=True)
class RankMemory:
    pp_rank: int
    state: ModelStateBytes
    activations: int

    @property
    def total(self) -> int:
        return self.state.total + self.activations


def plan_memory(cfg: JobConfig, dims: ParallelDims, exact: bool = False, jobs: int = 1) -> list[RankMemory]:
    """Every pipeline rank's predicted memory (the first rank of each: the others of a stage hold the same);
    deep models from two shallow copies unless `exact`. The simulations (each pipeline rank, each copy) run in
    `jobs` processes."""
    if cfg.engine.name != "native":
        return _engine_memory(cfg, dims, exact, jobs)
    depths = None if exact else shallow_depths(cfg, dims)
    if depths is None:
        return _simulated([cfg], dims, jobs)[0]
    spec = get_recipe(cfg.recipe).supports.pipeline
    lows, highs = _simulated([replace(cfg, model=spec.with_trunk_depth(cfg.model, d)) for d in depths], dims, jobs)
    full = spec.trunk_depth(cfg.model)
    return [
        _along_line(low, high, *(_rank_blocks(cfg, dims, low.pp_rank, d) for d in (*depths, full)))
        for low, high in zip(lows, highs, strict=True)
    ]


def _engine_memory(cfg: JobConfig, dims: ParallelDims, exact: bool, jobs: int) -> list[RankMemory]:
    """An engine that owns data parallelism (EngineSpec.plan_cost): its model state as it says, the activations
    and the model's buffers as the native engine's DDP over as many ranks has them (a rank runs the same
    micro-batch through the same module)."""
    plan_cost = get_engine(cfg.engine.name).plan_cost
    if plan_cost is None:
        raise ValueError(f"engine.name: the planner predicts the native engine and DeepSpeed, not {cfg.engine.name!r}")
    ddp = replace(cfg, engine=replace(cfg.engine, name="native"),
                  parallel=replace(cfg.parallel, dp_replicate=dims.dp_shard, dp_shard=1))  # fmt: skip
    (native,) = plan_memory(ddp, ParallelDims.resolve(ddp.parallel.degrees, dims.world_size), exact, jobs)
    # Under DDP a rank holds every weight and gradient in fp32: the counts the engine's cost needs.
    cost = plan_cost(cfg, dims, native.state.parameters // FP32, native.state.gradients // FP32)
    state = ModelStateBytes(cost.parameter_bytes, cost.gradient_bytes, cost.optimizer_bytes, native.state.ema,
                            native.state.buffers + cost.buffer_bytes, 0)  # fmt: skip
    return [RankMemory(0, state, native.activations)]


def shallow_depths(cfg: JobConfig, dims: ParallelDims) -> tuple[int, int] | None:
    """The two trunk depths to simulate (3 and 4 blocks per stage), or None when the model is simulated whole."""
    spec = get_recipe(cfg.recipe).supports.pipeline
    if spec is None or spec.with_trunk_depth is None or cfg.parallel.pp_layer_boundaries:
        return None
    stages = num_stages(dims.pp, cfg.parallel.stages_per_rank) if dims.pp_enabled else 1
    depths = tuple(n * stages for n in SHALLOW_BLOCKS_PER_STAGE)
    if spec.trunk_depth(cfg.model) < 2 * depths[-1] or spec.with_trunk_depth(cfg.model, depths[0]) is None:
        return None  # barely deeper than the copies (nothing to save), or blocks that differ
    return depths[0], depths[1]


def _simulated(cfgs: list[JobConfig], dims: ParallelDims, jobs: int) -> list[list[RankMemory]]:
    """Each config's pipeline ranks, simulated in up to `jobs` forked processes (each builds its own fake world;
    fork, so that they start with everything imported)."""
    work = [(cfg, dims, pp_rank) for cfg in cfgs for pp_rank in range(dims.pp)]
    jobs = min(jobs, len(work))
    if jobs > 1:
        share_pipeline_input(cfgs[0], dims)  # the same for every copy: worked out once, inherited
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.starmap(simulate_rank, work)
    else:
        results = [simulate_rank(*w) for w in work]
    memories = [RankMemory(pp_rank, model_state_bytes(shards, cfg, dims), activations)
                for (cfg, _, pp_rank), (shards, activations) in zip(work, results, strict=True)]  # fmt: skip
    return [memories[i : i + dims.pp] for i in range(0, len(memories), dims.pp)]


def _rank_blocks(cfg: JobConfig, dims: ParallelDims, pp_rank: int, depth: int) -> int:
    """Trunk blocks on pipeline rank `pp_rank` when the trunk has `depth` of them, split as the trainer splits."""
    if not dims.pp_enabled:
        return depth
    p = cfg.parallel
    split = split_layers(depth, num_stages(dims.pp, p.stages_per_rank))
    return sum(len(split[sid]) for sid in stage_ids_for_rank(pp_rank, dims.pp, p.stages_per_rank, p.pp_schedule))


def _along_line(low: RankMemory, high: RankMemory, low_blocks: int, high_blocks: int, blocks: int) -> RankMemory:
    """Each number of `low` and `high` (simulated with low_blocks and high_blocks) carried to `blocks`."""

    def at(a: int, b: int) -> int:
        return round(a + (b - a) * (blocks - low_blocks) / (high_blocks - low_blocks))

    low_state, high_state = asdict(low.state), asdict(high.state)
    state = ModelStateBytes(**{k: at(low_state[k], high_state[k]) for k in low_state})
    return RankMemory(low.pp_rank, state, at(low.activations, high.activations))

"""Parallel degrees -> validated sizes -> one DeviceMesh with named axes.

Axis order, outermost first: pp, dp_replicate, dp_shard, cp, tp. tp is innermost so its
ranks are neighbours (same node, fastest links); pp is outermost because it sends the
least data. Flattened axes used by the core:
  dp          = dp_replicate x dp_shard          (data loading: ranks that see different samples)
  dp_shard_cp = dp_shard x cp                    (FSDP shards over both: cp ranks hold the same weights)
  dp_cp       = dp_replicate x dp_shard x cp     (loss / grad-norm averaging)

Expert parallel (ep) is not a sixth axis: it splits the dp_shard x cp ranks into (edp, ep), ep innermost, as
a second mesh over the same ranks ("pp", "dp_replicate", "edp", "ep", "tp"). Routed experts are sharded over
ep; every rank with the same ep coordinate holds the same experts, so FSDP shards them over what is left,
efsdp = edp x tp (scaletrain/parallel/expert_parallel.py).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def divisors(n: int) -> list[int]:
    """The allowed degrees that split n ways evenly (for error messages)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def implied_world_size(degrees: dict[str, int]) -> int:
    """The processes a layout names: the product of its degrees, with dp_shard=-1 (auto) counted as 1."""
    return math.prod(max(1, degrees[axis]) for axis in AXES)


@dataclass
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    world_size: int
    # True when a training engine (DeepSpeed, fairscale) replicates or shards over the data axis itself:
    # recipes' parallelize then applies no FSDP/DDP (apply_data_parallel sees every *_enabled False).
    engine_data_parallel: bool = False
    ep: int = 1  # expert parallel: borrowed from dp_shard x cp, so not part of the world-size product
    _mesh: DeviceMesh | None = field(default=None, repr=False)
    _axes: dict[str, DeviceMesh] = field(default_factory=dict, repr=False)
    _expert_root: DeviceMesh | None = field(default=None, repr=False)

    @classmethod
    def resolve(
        cls, degrees: dict[str, int], world_size: int, engine_data_parallel: bool = False, ep: int = 1
    ) -> ParallelDims:
        """Fill dp_shard=-1 from the world size and check that the product matches it (and that ep divides
        dp_shard x cp, the ranks it borrows)."""
        for axis in AXES:
            value = degrees[axis]
            if value < 1 and not (axis == "dp_shard" and value == -1):
                allowed = "-1 (auto) or >= 1" if axis == "dp_shard" else ">= 1"
                raise ValueError(f"parallel.{axis}: {value} is not allowed; use {allowed}")
        dp_shard = degrees["dp_shard"]
        others = degrees["pp"] * degrees["dp_replicate"] * degrees["cp"] * degrees["tp"]
        if dp_shard == -1:
            if world_size % others:
                raise ValueError(
                    f"parallel: pp*dp_replicate*cp*tp = {others} does not divide the world size {world_size}"
                )
            dp_shard = world_size // others
        product = others * dp_shard
        if product != world_size:
            desc = " x ".join(f"{a}={degrees[a] if a != 'dp_shard' else dp_shard}" for a in AXES)
            raise ValueError(
                f"parallel: {desc} = {product} ranks, but the world size is {world_size}; "
                "make the product equal the number of processes (dp_shard=-1 fills in the rest)"
            )
        pp, dp_replicate, cp, tp = (degrees[a] for a in ("pp", "dp_replicate", "cp", "tp"))
        if ep < 1 or (dp_shard * cp) % ep:
            raise ValueError(
                f"parallel.ep: {ep} must be >= 1 and divide dp_shard x cp = {dp_shard} x {cp} = {dp_shard * cp} "
                "(expert parallel borrows the data-parallel shard and context-parallel ranks); "
                f"allowed: {', '.join(map(str, divisors(dp_shard * cp)))}"
            )
        return cls(pp, dp_replicate, dp_shard, cp, tp, world_size, engine_data_parallel, ep)

    # Which strategies are on.
    @property
    def fsdp_enabled(self) -> bool:
        if self.engine_data_parallel:
            return False
        return self.dp_shard > 1 or (self.cp > 1 and not self.ddp_enabled)

    @property
    def ddp_enabled(self) -> bool:
        """Plain DDP: replicas and nothing else. With tp/cp/pp, replication goes through HSDP."""
        if self.engine_data_parallel:
            return False
        return self.dp_replicate > 1 and self.dp_shard == 1 and self.tp == 1 and self.cp == 1 and self.pp == 1

    @property
    def hsdp_enabled(self) -> bool:
        return self.dp_replicate > 1 and not self.ddp_enabled and not self.engine_data_parallel

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    def describe(self) -> str:
        on = [f"{a}={getattr(self, a)}" for a in (*AXES, "ep") if getattr(self, a) > 1]
        return " x ".join(on) if on else "single process"

    @property
    def mesh(self) -> DeviceMesh:
        if self._mesh is None:
            raise RuntimeError("ParallelDims.build_mesh(device_type) has not been called")
        return self._mesh

    def build_mesh(self, device_type: str) -> DeviceMesh:
        sizes = {a: getattr(self, a) for a in AXES}
        # Keep every axis, including size-1 ones: code can then always ask for axis("tp")
        # etc., and the flattened axes below exist in every layout.
        mesh = init_device_mesh(device_type, tuple(sizes.values()), mesh_dim_names=AXES)
        self._axes = {a: mesh[a] for a in AXES}
        self._axes["dp"] = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        self._axes["dp_shard_cp"] = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        self._axes["dp_cp"] = mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        self._mesh = mesh
        return mesh

    def _build_expert_mesh(self) -> None:
        """Built on first use (by a recipe with routed experts; collective, like all of parallelize).
        The same ranks with dp_shard x cp regrouped as (edp, ep): ranks r..r+ep-1 of each dp_shard_cp group
        form an ep group. A second root mesh, because FSDP2 wants an expert's ep placement and its FSDP
        mesh to come from one root."""
        edp = self.dp_shard * self.cp // self.ep
        names = ("pp", "dp_replicate", "edp", "ep", "tp")
        shape = (self.pp, self.dp_replicate, edp, self.ep, self.tp)
        mesh = init_device_mesh(self.mesh.device_type, shape, mesh_dim_names=names)
        self._axes["ep"] = mesh["ep"]
        self._axes["efsdp"] = mesh["edp", "tp"]._flatten("efsdp")
        self._expert_root = mesh

    def axis(self, name: str) -> DeviceMesh:
        """The 1-D mesh of one axis (plain or flattened), e.g. axis("tp"), axis("dp_cp")."""
        self.mesh  # noqa: B018 - raises if the mesh was not built
        if name in ("ep", "efsdp") and self._expert_root is None:
            self._build_expert_mesh()
        return self._axes[name]

    def expert_fsdp_mesh(self) -> DeviceMesh:
        """Where routed experts' FSDP shards live: efsdp (edp x tp), with dp_replicate in front for HSDP."""
        efsdp = self.axis("efsdp")
        if self.dp_replicate == 1:
            return efsdp
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # as in hsdp_mesh
            return self._expert_root["dp_replicate", "efsdp"]

    def hsdp_mesh(self) -> DeviceMesh:
        """2-D (dp_replicate, dp_shard_cp) mesh for HSDP."""
        with warnings.catch_warnings():
            # torch >= 2.11 warns that slicing flattened axes from the root will change;
            # it still works in 2.11-2.13, and there is no other public way to get this 2-D view.
            warnings.simplefilter("ignore", UserWarning)
            return self.mesh["dp_replicate", "dp_shard_cp"]

    def dp_coordinates(self) -> tuple[int, int]:
        """(rank, size) along the data axis — what the data loader shards by."""
        dp_mesh = self.axis("dp")
        return dp_mesh.get_local_rank(), dp_mesh.size()


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"

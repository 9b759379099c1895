"""Run scaletrain's training inside the current process (a Slurm task, a Ray worker).

Launchers that start the ranks themselves (srun via submitit, Ray Train) call
`train_in_process` on every rank after setting torch.distributed's env:// variables.
Paths are made absolute at submission (`absolute_job`), because those workers may start
in another directory (Ray's session folder) than the one the user typed the command in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from scaletrain.config import JobConfig


@dataclass
class TrainJob:
    """What every rank runs: `scaletrain.train <config> <overrides>` (picklable)."""

    config: str
    overrides: list[str] = field(default_factory=list)

    def argv(self) -> list[str]:
        return [self.config, *self.overrides]


def absolute_job(config: str, overrides: list[str], cfg: JobConfig) -> TrainJob:
    """The job with an absolute config path and an absolute job.run_dir (as an override)."""
    extra: list[str] = []
    run_dir = Path(cfg.job.run_dir)
    if not run_dir.is_absolute():
        extra = ["--job.run_dir", str(run_dir.resolve())]
    return TrainJob(str(Path(config).resolve()), [*overrides, *extra])


def run_dir_of(cfg: JobConfig) -> Path:
    return Path(cfg.job.run_dir).resolve() / cfg.job.name


def train_in_process(job: TrainJob) -> None:
    """Train on this rank; raises RuntimeError when the trainer exits with an error code."""
    from scaletrain.train import main as train_main

    try:
        train_main(job.argv())
    except SystemExit as exc:
        # The trainer reports config errors with SystemExit(2); a scheduler wants a failure it can show.
        if exc.code not in (None, 0):
            raise RuntimeError(f"scaletrain.train {' '.join(job.argv())} exited with {exc.code}") from exc

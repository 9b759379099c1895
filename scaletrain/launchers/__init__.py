"""Start scaletrain on many processes and nodes (docs/launching.md has every command).

  checks.py        what every launcher verifies before starting or queueing anything
  argv.py          launcher flags vs `--section.field` config overrides
  torchrun.py      torchrun on one node or many (standalone, c10d, static rendezvous)
  sbatch.py        render slurm/*.sbatch (one torchrun per node, optional requeue) and submit
  slurm.py         submitit: one Slurm task per rank; slurm_env.py maps SLURM_* to torch's env
  ray_launcher.py  Ray Train TorchTrainer on a local or existing Ray cluster
  inprocess.py     the in-process training call used by submitit tasks and Ray workers
  cli.py           `scaletrain launch {torchrun,slurm,sbatch,ray} ...` -> launchers.cli.main(argv)

Imports point one way: launchers -> scaletrain, never back.
"""

from pathlib import Path

# The folder that holds the `scaletrain` package (the repository root in a checkout): workers get it first
# on PYTHONPATH so they train the code the launcher checked, and the sbatch templates live in its slurm/.
SOURCE_ROOT = Path(__file__).resolve().parents[2]

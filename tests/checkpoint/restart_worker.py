"""torchrun worker for the elastic-restart reconnect tests (tests/checkpoint/test_faults.py).

First group: both ranks join through scaletrain's init_distributed and all-reduce once; then
rank 0 writes ST_RESTART_MARKER and SIGKILLs itself, so torchrun restarts the group.
Restarted group (the marker exists): rank 0 waits RESTART_DELAY_S before joining, so rank 1
reaches gloo's connectFullMesh first — the order in which a rank that reads the dead group's
keys from torchrun's shared store connects to the killed process's address and fails. Each
rank prints the store's keys before joining (when torchrun shares its store) and a line
once its all-reduce succeeded.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from scaletrain.distributed import init_distributed

RESTART_DELAY_S = 2.0

if __name__ == "__main__":
    rank = int(os.environ["RANK"])
    marker = Path(os.environ["ST_RESTART_MARKER"])
    phase = "restarted" if marker.exists() else "first"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        probe = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
        print(f"restart_worker: {phase} rank {rank} store keys before joining: {sorted(probe.list_keys())}", flush=True)
        del probe
    if phase == "restarted" and rank == 0:
        time.sleep(RESTART_DELAY_S)
    init_distributed("gloo", timeout_s=30)
    total = torch.ones(1)
    dist.all_reduce(total)
    print(f"restart_worker: {phase} rank {rank} all_reduce {total.item():g}", flush=True)
    if phase == "first" and rank == 0:
        marker.write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # in the first group rank 1 fails here (its peer is gone) or torchrun stops it
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (gloo threads; see scaletrain/train.py)

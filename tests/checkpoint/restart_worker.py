"""torchrun worker for the elastic-restart reconnect test (tests/checkpoint/test_faults.py).

Attempt 0: both ranks join the group through scaletrain's init_distributed, all-reduce once,
then rank 0 SIGKILLs itself, so torchrun restarts the group. Attempt 1: rank 0 waits
RESTART_DELAY_S before joining, so rank 1 reaches gloo's connectFullMesh first — the order
in which a rank that reads the dead group's keys from torchrun's shared store connects to
the killed process's address and fails. Each rank prints what it found in the store before
joining and a line when its all-reduce succeeded.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from scaletrain.distributed import init_distributed

RESTART_DELAY_S = 2.0

if __name__ == "__main__":
    rank = int(os.environ["RANK"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        probe = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
        keys = sorted(probe.list_keys())
        print(f"restart_worker: attempt {attempt} rank {rank} store keys before joining: {keys}", flush=True)
        del probe
    if attempt > 0 and rank == 0:
        time.sleep(RESTART_DELAY_S)
    init_distributed("gloo", timeout_s=30)
    total = torch.ones(1)
    dist.all_reduce(total)
    print(f"restart_worker: attempt {attempt} rank {rank} all_reduce {total.item():g}", flush=True)
    if attempt == 0 and rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # in attempt 0 rank 1 fails here (its peer is gone) or torchrun stops it
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (gloo threads; see scaletrain/train.py)

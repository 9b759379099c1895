"""Fault handling around the train loop: preemption signals and the step watchdog.

Preemption. SIGTERM (what torchrun, Kubernetes and Slurm send first) and SIGUSR1 (Slurm's
`--signal=USR1@120`) only set a flag: a handler must not save from inside an arbitrary
point of a step. The loop asks `Preemption.agreed()` at each step boundary; that
all-reduces the flag (MAX) so that one signalled rank stops every rank at the same step,
they save a final checkpoint together, and exit. torchrun forwards SIGTERM to its workers
and waits 30 s before SIGKILL, so the final save must fit in that window.

Watchdog. A rank stuck in a collective (a peer died without closing its socket, a
deadlock, a hung file system) otherwise stalls silently until the collective timeout. A
daemon thread checks a deadline that the loop re-arms around each step and save; when it
passes, the thread prints a header naming the rank, step and phase, then every thread's
Python stack (faulthandler, which works while the main thread is blocked in C++), and
exits the process with EXIT_HUNG, which makes torchrun tear down (or restart) the group.
faulthandler's own timer is armed as a backstop in case the main thread holds the GIL.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from types import FrameType

import torch
import torch.distributed as dist

EXIT_HUNG = 3
_SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGUSR1": signal.SIGUSR1}


class Preemption:
    """Records SIGTERM/SIGUSR1; `agreed()` is the collective decision to stop at this step."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. not in a notebook worker)
        for sig in _SIGNALS.values():
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> str | None:
        """Collective: the signal's name if any rank received one, on every rank; else None."""
        mine = _SIGNALS.get(self.signal_name or "", 0)
        flag = torch.tensor([int(mine)], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # A CPU tensor goes over gloo (CPU runs, or the cpu:gloo half of "cuda:nccl,cpu:gloo");
            # an NCCL-only group needs it on the GPU.
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        value = int(flag.item())
        if not value:
            return None
        self.signal_name = self.signal_name or signal.Signals(value).name
        return signal.Signals(value).name


class StepWatchdog:
    """Turns a step (or save) that outlives `timeout_s` into a stack dump and an exit."""

    def __init__(self, timeout_s: float, rank: int) -> None:
        self.timeout_s = float(timeout_s)
        self.rank = rank
        self._deadline: float | None = None
        self._what = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._watch, name="scaletrain-watchdog", daemon=True)
        self._thread.start()

    def arm(self, what: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._deadline = time.monotonic() + self.timeout_s
            self._what = what
        # Backstop for a main thread that never releases the GIL (this thread could not run).
        faulthandler.dump_traceback_later(2 * self.timeout_s + 10, exit=True)

    def disarm(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._deadline = None
        faulthandler.cancel_dump_traceback_later()

    def stop(self) -> None:
        self.disarm()
        self._stop.set()

    def _watch(self) -> None:
        interval = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(interval):
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
                what = self._what
            if late:
                self._fire(what)

    def _fire(self, what: str) -> None:
        sys.stderr.write(
            f"\nscaletrain watchdog: rank {self.rank} (pid {os.getpid()}) is stuck in {what} for more than "
            f"{self.timeout_s:g} s (parallel.step_timeout_s); likely a collective that another rank never "
            "joined, or a hung file system. Python stacks of this rank follow.\n"
        )
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_HUNG)

"""Suite-wide test setup: subprocesses find this checkout; Triton kernels run in the interpreter without a GPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # st_common
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# torchrun children must import scaletrain from this checkout even when it is not installed.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
# Set before anything imports triton: without a GPU the kernels run in Triton's interpreter.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""Without Triton the package must import, say so, and serve every function from the torch references."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_imports_and_runs_without_triton():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        from scaletrain import kernels
        assert kernels.TRITON_AVAILABLE is False
        q = torch.randn(1, 2, 9, 16, requires_grad=True)
        out, lse = kernels.attention(q, q, q, causal=True, window=3, return_lse=True)
        out.sum().backward()
        x = torch.randn(3, 8)
        kernels.rms_norm(x, torch.ones(8), 1e-6)
        kernels.swiglu(x, x)
        kernels.apply_rope(q.detach().transpose(1, 2), q.detach().transpose(1, 2), torch.ones(9, 8), torch.zeros(9, 8))
        h = torch.randn(10, 16, requires_grad=True)
        loss = kernels.fused_linear_cross_entropy(h, torch.randn(7, 16), torch.randint(0, 7, (10,)), chunk_size=4)
        loss.backward()
        print("fallback-ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and "fallback-ok" in res.stdout, res.stderr[-2000:]

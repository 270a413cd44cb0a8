"""Peak-memory measurement in a fresh process, shared by the head tests (tests/test_kernels.py) and the per-token
quantity tests (tests/test_selective_entropy.py): the allocator returns freed blocks to the OS (MALLOC_MMAP_THRESHOLD_),
so the resident-size peak shows what the code under test holds, not what earlier tests left in the heap."""
import json
import os
import subprocess
import sys

import pytest


def prelude(n: int, d: int = 64, v: int = 32768) -> str:
    "The child's first lines: random hidden states h [n, d], head w [v, d] (both with grad), labels y with ignored rows."
    return f"""
import json, torch
from entropy_rl.kernels import cpu_peak_memory_mb
n, d, v = {n}, {d}, {v}
g = torch.Generator().manual_seed(0)
h = (2 * torch.randn(n, d, generator=g)).requires_grad_()
w = (0.7 * torch.randn(v, d, generator=g)).requires_grad_()
y = torch.randint(0, v, (n,), generator=g); y[::7] = -100
try:
    cpu_peak_memory_mb(lambda: None)
except RuntimeError:
    print(json.dumps(None)); raise SystemExit
"""


def run_child(body: str, n: int, timeout: int = 600):
    "Run prelude(n) + body in a fresh process; its last printed line (JSON). Skips where the meter cannot work."
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576", "OMP_NUM_THREADS": "2"}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", prelude(n) + body], capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if res is None:
        pytest.skip("no /proc/self/clear_refs on this system")
    return res

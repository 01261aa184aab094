"""Compile (fullgraph) a forward + backward through the op and print the whole error if it fails
(Inductor reports a Triton compile error from a worker with the useful part cut off; run with
TORCHINDUCTOR_COMPILE_THREADS=1 to get it in full). Device machine:

    TORCHINDUCTOR_COMPILE_THREADS=1 python benchmarks/compile_check.py
"""

import traceback

import torch

from hgrn2mini.ops import chunk_hgrn2

q = torch.randn(2, 130, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn_like(q, requires_grad=True)
g = torch.nn.functional.logsigmoid(torch.randn(2, 130, 2, 64, device="cuda")).requires_grad_()
def f(q, g, v):
    return chunk_hgrn2(q, g, v)[0].float().square().sum()
try:
    torch.compile(f, fullgraph=True)(q, g, v).backward()
    print("compile ok")
except Exception:
    s = traceback.format_exc()
    print(s)

"""Per-kernel CUDA times of the Triton path at one shape (device machine).

    python benchmarks/profile_kernels.py [B T H K] [--gates uniform30]
"""

import os
import sys

import torch
from hgrn2mini.kernels import chunk as C

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run with python -P too
from bench_chunk import inputs, kernel_times  # noqa: E402

args = [a for a in sys.argv[1:] if not a.startswith("--")]
B, T, H, K = (int(x) for x in args[:4]) if len(args) >= 4 else (8, 2048, 8, 128)
q, g, v = (x.detach() for x in inputs(B, T, H, K, "uniform30" if "uniform30" in sys.argv else "logsigmoid"))
do = torch.randn_like(v)
s = K**-0.5


def fwd_bwd():
    """As the op runs them: the backward reuses the forward's states when CONFIG keeps them."""
    _, _, states = C.chunk_hgrn2_fwd_with_states(q, g, v, None, s)
    C.chunk_hgrn2_bwd(q, g, v, None, do, None, s, states if C.CONFIG["keep_states"] else None)


print("shape", B, T, H, K, sys.argv[1:], "ms per fwd + bwd:")
for name, ms in sorted(kernel_times(fwd_bwd).items(), key=lambda x: -x[1]):
    print(f"  {name[:60]:60s} {ms:.4f}")

"""Per-kernel CUDA times of the Triton path at one shape, over a few launch configurations.

    python benchmarks/profile_kernels.py [B T H K]      (on the device machine)
"""

import itertools
import sys

import torch
import torch.nn.functional as F
from hgrn2mini.kernels import chunk as C
from torch.profiler import ProfilerActivity, profile

B, T, H, K = (int(x) for x in sys.argv[1:5]) if len(sys.argv) > 4 else (8, 2048, 8, 128)
V = K
q = torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16)
v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
do = torch.randn_like(v)
g = F.logsigmoid(torch.randn(B, T, H, K, device="cuda"))
s = K**-0.5


def kernel_times(cfg, reps=20):
    C.CONFIG.update(cfg)
    for _ in range(3):
        C.chunk_hgrn2_fwd(q, g, v, None, s)
        C.chunk_hgrn2_bwd(q, g, v, None, do, None, s)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            C.chunk_hgrn2_fwd(q, g, v, None, s)
            C.chunk_hgrn2_bwd(q, g, v, None, do, None, s)
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and "kernel" in e.key:
            out[e.key.split("_kernel")[0].lstrip("_")] = round(e.device_time_total / 1e3 / reps, 4)
    return out


base = dict(C.CONFIG)
print("shape", B, T, H, K, "ms per call", flush=True)
for sw, iw, dw, bk, bv in itertools.product([8], [4, 8], [4, 8], [32, 64], [64]):
    cfg = dict(base, state_warps=sw, intra_warps=iw, dqg_warps=dw, dqg_bk=bk, dqg_bv=bv)
    try:
        print(cfg, kernel_times(cfg), flush=True)
    except Exception as e:  # noqa: BLE001 - a config that does not fit is reported, not fatal
        print(cfg, "failed", str(e)[:300], flush=True)

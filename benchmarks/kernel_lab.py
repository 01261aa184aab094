"""Each Triton kernel of the op on its own, over launch configurations: registers, spills and
do_bench median time (device machine). For choosing CONFIG, not a benchmark of the op.

    python benchmarks/kernel_lab.py [B T H K]     (env LAB=state,out,dqg picks the kernels)
"""

import itertools
import os
import sys

import torch
import torch.nn.functional as F
from hgrn2mini.kernels import dqg, out, reference, settings, state
from triton.testing import do_bench

B, T, H, K = (int(x) for x in sys.argv[1:5]) if len(sys.argv) > 4 else (8, 2048, 8, 128)
V = K
dev = "cuda"
q = torch.randn(B, T, H, K, device=dev, dtype=torch.bfloat16)
v = torch.randn(B, T, H, V, device=dev, dtype=torch.bfloat16)
do = torch.randn_like(v)
g = F.logsigmoid(torch.randn(B, T, H, K, device=dev))
# b in each chunk, as the dv kernel stores it
gcum = reference._unchunked(reference._chunked(g, settings._BT).cumsum(-2), T).contiguous()
s = K**-0.5
NT = (T + 63) // 64
DT, PREC, PREC32 = settings._dot_config(q.dtype)
states = torch.randn(B * H, NT, K, V, device=dev, dtype=q.dtype)
dstates = torch.randn_like(states)
hT = torch.empty(B, H, K, V, device=dev)
o = torch.empty_like(v)
dq, dg, dv = torch.empty_like(q), torch.empty_like(g), torch.empty_like(v)
flags = torch.empty(B * H * NT * K, device=dev, dtype=torch.int8)  # enough for any grid below


def report(name, kernel, grid, args, cfg, **meta):
    """Launches kernel[grid](*args, **cfg, **meta) raw (not through wrap_triton, to see the
    compiled kernel), then times the same launch."""
    warps, stages = meta.pop("num_warps"), meta.pop("num_stages", 1)

    def launch():
        return kernel[grid](*args, **cfg, **meta, num_warps=warps, num_stages=stages)

    try:
        k = launch()
        ms = do_bench(launch, warmup=10, rep=50, return_mode="median")
        regs, spills = getattr(k, "n_regs", "?"), getattr(k, "n_spills", "?")
        print(f"{name:6s} {cfg} warps {warps} stages {stages} regs {regs} spills {spills} {ms:.4f} ms", flush=True)
    except Exception as e:  # noqa: BLE001 - a config that does not fit is reported, not fatal
        print(name, cfg, "failed", str(e)[:200], flush=True)


common = dict(K=K, V=V, BT=64, DT=DT, PREC=PREC)
LAB = os.environ.get("LAB", "state,out,dqg").split(",")
for BS, warps, stages, rev in itertools.product([32, 64], [4, 8], [1, 3], [False, True]) if "state" in LAB else []:
    report("state", state._state_kernel, (K // BS, V // BS, B * H),
           (q, g, do if rev else v, hT, states, hT, hT, hT, T, H, s, 1), dict(BS=BS, REVERSE=rev),
           HAS_H0=False, SEGMENTED=False, PAIR=False, num_warps=warps, num_stages=stages,
           **common)

for BK, BVO, warps, dv_ in itertools.product([32, 64, 128], [64, 128], [4, 8], [False, True]) if "out" in LAB else []:
    # The whole-chunk variant: the GENERAL one only redoes flagged programs (none with these gates).
    report("out", out._out_kernel, (V // BVO, NT, B * H), (q, g, gcum, v, states, o, T, H, s, flags, hT, hT, 1),
           dict(BK=BK, BVO=BVO, DV=dv_), BC=16, FAST_RANGE=settings._FAST_RANGE, GENERAL=False, FLAGGED=False, REDO=1,
           JOIN=False, JR=32, STORE_GCUM=False, num_warps=warps, **common)

for BK, warps in itertools.product([16, 32, 64], [4, 8]) if "dqg" in LAB else []:
    report("dqg", dqg._dqg_kernel, (K // BK, NT, B * H),
           (q, g, gcum, v, do, states, dstates, dq, dg, T, H, s, flags, q, q, q, hT), dict(BK=BK, BV=BK), BC=16,
           PREC32=PREC32, FAST_RANGE=settings._FAST_RANGE, GENERAL=False, FLAGGED=False, REDO=1, GATES=False,
           HAS_LB=False, num_warps=warps, **common)

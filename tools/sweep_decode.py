"""Launch settings of the fused decode kernels (kernels/decode.py) at the 374M shapes, on a GPU.

    OUT=DIR SWEEP_S=200 python tools/sweep_decode.py

Each kernel runs over 24 layers' weights in turn (so L2 holds none of them) inside a CUDA graph,
at batch 1 ("b1") and 32 ("dot"), for the shipped setting first and then each candidate until
SWEEP_S seconds have passed, and the shipped setting once more without programmatic dependent
launch (kernels.decode.USE_PDL). Prints microseconds a call and the bandwidth of the weights and
state read; writes DIR/sweep_decode.json.
"""
import itertools
import json
import os
import time

import torch
from triton.testing import do_bench
import hgrn2mini.kernels.decode as kd

dev, dt = "cuda", torch.bfloat16
D, I, H, K, L = 1024, 2816, 8, 128, 24
torch.manual_seed(0)
W = [dict(q=torch.randn(D, D, device=dev, dtype=dt) * .03, f=torch.randn(D, D, device=dev, dtype=dt) * .03,
          i=torch.randn(D, D, device=dev, dtype=dt) * .03, o=torch.randn(D, D, device=dev, dtype=dt) * .03,
          g=torch.randn(I, D, device=dev, dtype=dt) * .03, u=torch.randn(I, D, device=dev, dtype=dt) * .03,
          d=torch.randn(D, I, device=dev, dtype=dt) * .02) for _ in range(L)]
nw = torch.ones(D, device=dev, dtype=dt)
gw = torch.ones(D, device=dev, dtype=torch.float32)
lb = torch.rand(D, device=dev) * .5
res = {}


def timed(fn):
    fn(); torch.cuda.synchronize()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=20, rep=200, return_mode="median") * 1e3 / L  # us per call


def calls(kernel, B):
    x = torch.randn(B, D, device=dev, dtype=dt); h = torch.randn(B, I, device=dev, dtype=dt)
    qfi = torch.randn(3, B, D, device=dev, dtype=dt); o = torch.empty(B, D, device=dev, dtype=dt)
    st = [torch.randn(B, H, K, K, device=dev) for _ in range(L)]
    live = torch.ones(B, dtype=torch.bool, device=dev)
    if kernel == "qfi":
        return (lambda: [kd.norm_matvec(x, nw, 1e-6, (w["q"], w["f"], w["i"]), qfi) for w in W]), 3 * D * D * 2
    if kernel == "o":
        return (lambda: [kd.norm_matvec_add(o, gw, 1e-5, w["o"], x) for w in W]), D * D * 2
    if kernel == "glu":
        return (lambda: [kd.norm_glu(x, nw, 1e-6, w["g"], w["u"], h) for w in W]), 2 * I * D * 2
    if kernel == "down":
        return (lambda: [kd.matvec_add(h, w["d"], x) for w in W]), D * I * 2
    if kernel == "state":
        return (lambda: [kd.recurrent_step(qfi, lb, live, s, o, K ** -.5) for s in st]), B * H * K * K * 4 * 2


GRID = {
    "b1": {k: [dict(BLOCK_B=1, BLOCK_N=n, BLOCK_K=bk, num_warps=w) for n, bk, w in
               itertools.product(*({"qfi": ([4, 8, 16], [256, 512], [4, 8]), "glu": ([4, 8, 16], [256, 512], [4, 8]),
                                   "o": ([2, 4, 8], [512, 1024], [4, 8]), "down": ([2, 4, 8], [512, 1024], [4, 8])}[k]))]
           for k in ("qfi", "o", "glu", "down")},
    # Longer K slices first: at B = 32 a program's [BLOCK_N, BLOCK_K] weight tile per stage is all it
    # has in flight, and o and down have 64 programs of 16 rows. BLOCK_B 16: twice the programs.
    "dot": {k: [dict(BLOCK_B=b, BLOCK_N=n, BLOCK_K=bk, num_warps=w, num_stages=s) for bk, b, n, w, s in
                itertools.product([256, 512, 128, 64], [32, 16], [16, 32, 64], [4, 8], [3, 2])]
            for k in ("qfi", "o", "glu", "down")},
}
GRID["b1"]["state"] = [dict(BLOCK_V=v, num_warps=w) for v in (8, 16, 32, 64) for w in (2, 4, 8)]
GRID["dot"]["state"] = [dict(BLOCK_V=v, num_warps=w) for v in (16, 32, 64, 128) for w in (4, 8)]
deadline = time.time() + float(os.environ.get("SWEEP_S", "200"))
for regime, B in (("b1", 1), ("dot", 32)):
    for kernel, cands in GRID[regime].items():
        base = dict(kd.LAUNCH[kernel][regime])
        fn, nbytes = calls(kernel, B)
        rows = []
        for c in [base] + [c for c in cands if c != base]:
            if time.time() > deadline:
                break
            kd.LAUNCH[kernel][regime] = c
            try:
                us = timed(fn)
                rows.append((us, c))
            except Exception as e:
                rows.append((float("inf"), dict(c, error=repr(e)[:80])))
        kd.LAUNCH[kernel][regime] = base
        kd.USE_PDL = False  # the shipped setting without programmatic dependent launch, for comparison
        no_pdl = timed(fn)
        kd.USE_PDL = True
        rows.sort(key=lambda r: r[0])
        b_us = next((us for us, c in rows if c == base), float("nan"))
        print(f"{regime} {kernel}: shipped {b_us:.2f} us ({nbytes / b_us / 1e3:.0f} GB/s; {no_pdl:.2f} without PDL); best "
              + "; ".join(f"{us:.2f} {c}" for us, c in rows[:3]), flush=True)
        res[f"{regime}_{kernel}"] = dict(shipped_us=b_us, no_pdl_us=no_pdl, bytes=nbytes, best=[(us, c) for us, c in rows[:5]])
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "sweep_decode.json"), "w"), indent=1, default=str)

"""Accuracy and speed of the Triton path over dq/dg kernel configurations (device machine).

    python benchmarks/sweep_configs.py
"""

import torch
import torch.nn.functional as F
from hgrn2mini.kernels import chunk as C
from triton.testing import do_bench

from hgrn2mini.ops import chunk_hgrn2


def rel(a, b):
    return round(((a.double() - b).norm() / b.norm()).item(), 6)


for bk, warps in [(32, 4), (64, 4), (32, 8), (64, 8)]:
    C.CONFIG.update(dqg_bk=bk, dqg_warps=warps)
    for dt in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        B, T, H, K = 2, 300, 2, 128
        q = torch.randn(B, T, H, K, device="cuda")
        v, do = torch.randn_like(q), torch.randn_like(q)
        g = F.logsigmoid(torch.randn_like(q))
        leaves = [q.to(dt).requires_grad_(), g.clone().requires_grad_(), v.to(dt).requires_grad_()]
        chunk_hgrn2(*leaves)[0].backward(do.to(dt))
        ref = C.chunk_hgrn2_bwd_ref(*(x.detach().double() for x in leaves), None, do.to(dt).double(), None, K**-0.5)
        print(bk, warps, dt, "rel err dq, dg, dv", [rel(x.grad, r) for x, r in zip(leaves, ref)], flush=True)
    B, T, H = 8, 2048, 8
    q = torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(q, requires_grad=True)
    g = F.logsigmoid(torch.randn(B, T, H, K, device="cuda")).requires_grad_()
    do = torch.randn_like(q)

    def fwd_bwd(q=q, g=g, v=v, do=do):
        chunk_hgrn2(q, g, v)[0].backward(do)

    fwd = do_bench(lambda q=q, g=g, v=v: chunk_hgrn2(q, g, v), return_mode="median")
    both = do_bench(fwd_bwd, grad_to_none=[q, g, v], return_mode="median")
    print(bk, warps, "fwd ms", fwd, "fwd+bwd ms", both, flush=True)

"""One forward + backward of the op at a (K, V, dtype) against the float64 chunked reference.

    python benchmarks/check_shapes.py K V dtype [nofast] (device machine; one process per shape,
                                                          since a faulting kernel poisons the context)
"""

import sys

import torch
import torch.nn.functional as F
from hgrn2mini.kernels.chunk import chunk_hgrn2_bwd_ref, chunk_hgrn2_fwd_ref

from hgrn2mini.ops import chunk_hgrn2

K, V, dt = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3])
if "nofast" in sys.argv:  # the default configuration even where chunk.FAST overrides it
    from hgrn2mini.kernels import chunk

    chunk.FAST.clear()
torch.manual_seed(0)
B, T, H = 2, 130, 2
q = torch.randn(B, T, H, K, device="cuda")
v = torch.randn(B, T, H, V, device="cuda")
g = F.logsigmoid(torch.randn(B, T, H, K, device="cuda"))
h0 = torch.randn(B, H, K, V, device="cuda")
do, dht = torch.randn_like(v), torch.randn_like(h0)
leaves = [q.to(dt).requires_grad_(), g.clone().requires_grad_(), v.to(dt).requires_grad_(), h0.clone().requires_grad_()]
o, hT = chunk_hgrn2(*leaves)
torch.autograd.backward((o, hT), (do.to(dt), dht))
torch.cuda.synchronize()
qd, gd, vd, hd = (x.detach().double() for x in leaves)
o_r, hT_r = chunk_hgrn2_fwd_ref(qd, gd, vd, hd, K**-0.5)
grads = chunk_hgrn2_bwd_ref(qd, gd, vd, hd, do.to(dt).double(), dht.double(), K**-0.5)


def rel(a, b):
    return round(((a.double() - b).norm() / b.norm()).item(), 6)


print(K, V, sys.argv[3], "o", rel(o, o_r), "hT", rel(hT, hT_r), "dq dg dv dh0",
      [rel(x.grad, r) for x, r in zip(leaves, grads)], flush=True)

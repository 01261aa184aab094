"""One forward + backward of the op against the float64 chunked reference: relative errors.

    python benchmarks/check_shapes.py K V dtype [nofast] (device machine; one process per shape,
                                                          since a faulting kernel poisons the context)

`errors` is also what benchmarks/sweep_configs.py checks each configuration with.
"""

import sys

import torch
import torch.nn.functional as F
from hgrn2mini.kernels import chunk

from hgrn2mini.ops import chunk_hgrn2


def errors(K, V, dtype, B=2, T=130, H=2, gates="logsigmoid", device="cuda"):
    """Relative errors of o, the final state, dq, dg, dv and d initial state, with an initial state
    and a final-state gradient. gates: "logsigmoid" (logsigmoid(randn)) or "mixed" (half the
    channels g uniform in [-30, 0], the rest near 1: every in-chunk path at once)."""
    torch.manual_seed(0)
    q = torch.randn(B, T, H, K, device=device)
    v = torch.randn(B, T, H, V, device=device)
    g = F.logsigmoid(torch.randn(B, T, H, K, device=device) + (4 if gates == "mixed" else 0))
    if gates == "mixed":
        g = torch.where(torch.rand_like(g) < 0.5, -30 * torch.rand_like(g), g)
    h0 = torch.randn(B, H, K, V, device=device)
    do, dht = torch.randn_like(v), torch.randn_like(h0)
    leaves = [q.to(dtype).requires_grad_(), g.requires_grad_(), v.to(dtype).requires_grad_(), h0.requires_grad_()]
    o, hT = chunk_hgrn2(*leaves)
    torch.autograd.backward((o, hT), (do.to(dtype), dht))
    d = [x.detach().double() for x in leaves]
    o_r, hT_r = chunk.chunk_hgrn2_fwd_ref(*d, K**-0.5)
    grads = chunk.chunk_hgrn2_bwd_ref(*d, do.to(dtype).double(), dht.double(), K**-0.5)

    def rel(a, b):
        return round(((a.double() - b).norm() / b.norm()).item(), 6)

    out = {"o": rel(o, o_r), "hT": rel(hT, hT_r)}
    out.update({n: rel(x.grad, r) for n, x, r in zip(["dq", "dg", "dv", "dh0"], leaves, grads)})
    return out


if __name__ == "__main__":
    if "nofast" in sys.argv:  # the default configuration even where chunk.FAST overrides it
        chunk.FAST.clear()
    K, V, dtype = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    print(K, V, dtype, errors(K, V, getattr(torch, dtype)), flush=True)

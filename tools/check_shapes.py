"""One forward + backward of the op against the float64 chunked reference: relative errors.

    python tools/check_shapes.py K V dtype [--nofast] [--out DIR]

On a GPU, one process per shape (a faulting kernel poisons its CUDA context; tools/gpu_run.sh runs
the sweep). Prints one line, K V dtype and the errors; with --out also writes them to
DIR/shape_K_V_dtype.json. `errors` is also what tools/sweep_configs.py checks each configuration with.
"""

import argparse
import json
import os

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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("K", type=int, help="key dimension")
    p.add_argument("V", type=int, help="value dimension")
    p.add_argument("dtype", choices=("bfloat16", "float16", "float32"), help="dtype of q and v")
    p.add_argument("--nofast", action="store_true",
                   help="the default launch settings even where chunk.FAST overrides them")
    p.add_argument("--out", default=None, help="folder for shape_K_V_dtype.json (none: print only)")
    args = p.parse_args()
    if args.nofast:
        chunk.FAST.clear()
    errs = errors(args.K, args.V, getattr(torch, args.dtype))
    print(args.K, args.V, args.dtype, errs, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"shape_{args.K}_{args.V}_{args.dtype}.json"), "w") as fh:
            json.dump(dict(K=args.K, V=args.V, dtype=args.dtype, nofast=args.nofast, errors=errs), fh)


if __name__ == "__main__":
    main()

"""Does the op's time depend on where its buffers land? (device machine, fla optional)

    python benchmarks/buffer_placement.py

Ours fwd+bwd (do_bench median) at three shapes; then fla's chunk_gla once (its autotuning, as in
bench_chunk.py); ours again on new buffers; then `torch.cuda.empty_cache()` and ours again. On
2026-11-24 the same shape read 1.08 and 1.35 ms between such rounds (benchmarks/RESULTS.md).
"""

import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from hgrn2mini.ops import chunk_hgrn2

SHAPES = [(1, 16384, 8, 128), (2, 8192, 8, 128), (8, 2048, 8, 128)]


def inputs(B, T, H, K):
    q = torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(q, requires_grad=True)
    g = F.logsigmoid(torch.randn(B, T, H, K, device="cuda")).requires_grad_()
    return q, g, v, torch.randn_like(q)


def ours(B, T, H, K, tag):
    q, g, v, do = inputs(B, T, H, K)
    ms = do_bench(lambda: chunk_hgrn2(q, g, v)[0].backward(do), grad_to_none=[q, g, v], return_mode="median")
    print(json.dumps(dict(tag=tag, shape=[B, T, H, K], fwdbwd=round(ms, 4),
                          reserved_GB=round(torch.cuda.memory_reserved() / 1e9, 2))), flush=True)


def main():
    for s in SHAPES:
        ours(*s, "before")
    try:
        from fla.ops.gla import chunk_gla
    except ImportError:
        chunk_gla = None
    if chunk_gla is not None:
        q, g, v, do = inputs(8, 2048, 8, 128)
        o, _ = chunk_gla(q, torch.randn_like(q), v, g)
        o.backward(do)
        torch.cuda.synchronize()
        del q, g, v, do, o
        for s in SHAPES:
            ours(*s, "after_fla")
    torch.cuda.empty_cache()
    for s in SHAPES:
        ours(*s, "after_empty_cache")


if __name__ == "__main__":
    main()

"""Does the op's time depend on where its buffers land? (device machine, fla optional)

    python benchmarks/buffer_placement.py

Ours fwd+bwd (do_bench median) at three shapes; then fla's chunk_gla once (its autotuning, as in
bench_chunk.py); ours again on new buffers; then `torch.cuda.empty_cache()` and ours again. On
2026-11-24 the same shape read 1.08 and 1.35 ms between such rounds (benchmarks/RESULTS.md).
"""

import json
import os
import sys

import torch

from hgrn2mini.ops import chunk_hgrn2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run with python -P too
from bench_chunk import fwd_bwd, inputs  # noqa: E402

SHAPES = [(1, 16384, 8, 128), (2, 8192, 8, 128), (8, 2048, 8, 128)]


def ours(B, T, H, K, tag):
    q, g, v = inputs(B, T, H, K)
    _, ms = fwd_bwd(lambda: chunk_hgrn2(q, g, v)[0], [q, g, v])
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
        q, g, v = inputs(8, 2048, 8, 128)
        o, _ = chunk_gla(q, torch.randn_like(q), v, g)
        o.backward(torch.randn_like(o))
        torch.cuda.synchronize()
        del q, g, v, o
        for s in SHAPES:
            ours(*s, "after_fla")
    torch.cuda.empty_cache()
    for s in SHAPES:
        ours(*s, "after_empty_cache")


if __name__ == "__main__":
    main()

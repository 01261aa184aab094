"""Does the op's time drift with the buffers held fixed? (device machine)

    python benchmarks/same_buffers.py [repeats]

Ours fwd+bwd at (8, 2048, 8, 128), do_bench median, `repeats` times on one set of inputs, then on
a second set allocated after emptying the allocator's cache. Separates a drift in time (clocks, a
neighbour on the machine) from a dependence on where the buffers land.
"""

import json
import os
import sys
import time

import torch

from hgrn2mini.ops import chunk_hgrn2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run with python -P too
from bench_chunk import fwd_bwd, inputs  # noqa: E402

repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 6
t0 = time.time()


def placement(i):
    torch.cuda.empty_cache()
    spacer = torch.empty((i * 7 + 1) << 20, device="cuda", dtype=torch.uint8)
    q, g, v = inputs(8, 2048, 8, 128)
    times = [round(fwd_bwd(lambda: chunk_hgrn2(q, g, v)[0], [q, g, v])[1], 4) for _ in range(repeats)]
    print(json.dumps(dict(placement=i, q_addr=hex(q.data_ptr()), g_addr=hex(g.data_ptr()),
                          fwdbwd=times, t=round(time.time() - t0, 1))), flush=True)
    del spacer


for i in range(3):
    placement(i)

"""One forward+backward of the op under Nsight Compute (device machine): each kernel's duration,
throughputs, occupancy and warp stall reasons, for seeing what bounds it.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
        python benchmarks/ncu_op.py [B T H K]

Only the last call (after warm-up and compilation) runs between cudaProfilerStart and Stop.
"""

import os
import sys

import torch

from hgrn2mini.ops import chunk_hgrn2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run with python -P too
from bench_chunk import inputs  # noqa: E402

B, T, H, K = (int(x) for x in sys.argv[1:5]) if len(sys.argv) > 4 else (8, 2048, 8, 128)
q, g, v = inputs(B, T, H, K)
do = torch.randn_like(v)
for i in range(3):
    if i == 2:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    chunk_hgrn2(q, g, v)[0].backward(do)
torch.cuda.synchronize()
torch.cuda.profiler.stop()

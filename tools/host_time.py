"""Host time of an eager forward + backward of the op and the gated op on a GPU (8 x 2048 x 8 x 128,
bf16): per-iteration wall time with Triton's own launches and with direct launches
(`kernels/launch.py`), the summed time inside launch calls, the time with every launch stubbed out
(the host work that is not launching), and torch's CPU-side profile of what remains. An eager call
is host-bound when its host time exceeds its device time (`benchmarks/bench_ops.py`).

    python tools/host_time.py
"""

from __future__ import annotations

import statistics
import time

import torch
import triton
from hgrn2mini.kernels import launch
from hgrn2mini.kernels.settings import CONFIG
from torch.profiler import ProfilerActivity, profile

import hgrn2mini.ops as ops

B, T, H, K = 8, 2048, 8, 128
DEV, DT = "cuda", torch.bfloat16


def make_steps():
    """Three eager calls: the gated op forward + backward, the plain op's, the gated forward alone."""
    torch.manual_seed(0)
    q = torch.randn(B, T, H * K, device=DEV, dtype=DT, requires_grad=True)
    f = torch.randn(B, T, H * K, device=DEV, dtype=DT, requires_grad=True)
    v = torch.randn(B, T, H, K, device=DEV, dtype=DT, requires_grad=True)
    lb = torch.rand(H * K, device=DEV) * 0.5
    do = torch.randn(B, T, H, K, device=DEV, dtype=DT)
    qp = torch.randn(B, T, H, K, device=DEV, dtype=DT, requires_grad=True)
    gp = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device=DEV)).requires_grad_()

    def gated():
        o, _ = ops.gated_chunk_hgrn2(q, f, lb, v, None, K**-0.5)
        o.backward(do)
        q.grad = f.grad = v.grad = None

    def plain():
        o, _ = ops.chunk_hgrn2(qp, gp, v, None, K**-0.5)
        o.backward(do)
        qp.grad = gp.grad = v.grad = None

    def forward():
        with torch.no_grad():
            ops.gated_chunk_hgrn2(q, f, lb, v, None, K**-0.5)

    return {"gated f+b": gated, "plain f+b": plain, "gated fwd": forward}


def wall(fn, n: int = 100) -> tuple[float, float]:
    """(host ms per call, ms per call with the GPU's work finished) over n calls after 10."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return host * 1e3, (time.perf_counter() - t) / n * 1e3


class _Stub:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    steps = make_steps()
    for name, fn in steps.items():
        for direct in (False, True):
            CONFIG["direct_launch"] = direct
            runs = [wall(fn) for _ in range(5)]
            print(f"{name:10s} direct={direct!s:5s} host {statistics.median(r[0] for r in runs):.3f} ms/iter, "
                  f"with sync {statistics.median(r[1] for r in runs):.3f}", flush=True)
    CONFIG["direct_launch"] = True

    inside = [0.0, 0]

    def timed(real):
        def run(self, *args, **kwargs):
            t = time.perf_counter()
            out = real(self, *args, **kwargs)
            inside[0] += time.perf_counter() - t
            inside[1] += 1
            return out
        return run

    patched = [(triton.runtime.jit.JITFunction, "run"), (launch._Launch, "launch")]
    originals = [getattr(cls, attr) for cls, attr in patched]
    for (cls, attr), real in zip(patched, originals):
        setattr(cls, attr, timed(real))
    wall(steps["gated f+b"], 100)
    for (cls, attr), real in zip(patched, originals):
        setattr(cls, attr, real)
    print(f"inside launch calls: {inside[0] / 110 * 1e3:.3f} ms/iter over {inside[1] / 110:.1f} launches")

    real_launcher = launch.launcher
    launch.launcher = ops._chunk.launcher = lambda kernel: _Stub()  # state.py looks up launch.launcher
    print(f"launches stubbed: gated f+b host {wall(steps['gated f+b'])[0]:.3f} ms/iter, "
          f"fwd {wall(steps['gated fwd'])[0]:.3f}")
    launch.launcher = ops._chunk.launcher = real_launcher

    for _ in range(5):
        steps["gated f+b"]()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            steps["gated f+b"]()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))


if __name__ == "__main__":
    main()

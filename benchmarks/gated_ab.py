"""The gated op's two CUDA paths side by side (device machine), forward + backward as training runs
them (the backward recomputes the gates):

    python benchmarks/gated_ab.py [8x2048x8,2x8192x8]     (B x T x H, K = V = 128, bf16)

A: the gates by Inductor (`gates` / `gates_bwd` under torch.compile) around the plain kernels, as
the op ran until 2026-11-24. B: the gates' Triton kernel and the dq/dg kernel carrying the
gradients through them (`gates_triton`, chunk_hgrn2_bwd(..., logits)), as it runs now. Each is
captured in a CUDA graph; rounds of do_bench interleave them; medians and the median per-round
ratio B/A. Also prints the relative difference of B's outputs from A's and each kernel's GPU time.
Forget logits ~ N(2, 1), lower bound in (0, 0.5).
"""

import functools
import statistics
import sys

import torch
from hgrn2mini.kernels import chunk as C
from hgrn2mini.kernels import launch
from hgrn2mini.kernels.gates import gates, gates_bwd, gates_triton
from triton.testing import do_bench

launch.launcher = lambda kernel: kernel  # raw launches: no triton_op around them here
compiled_gates, compiled_gates_bwd = torch.compile(gates), torch.compile(gates_bwd)


def a_step(y, x, lb, v, do, s, heads, backward=True):
    q, g = compiled_gates(y, x, lb)
    o, _, st = C.chunk_hgrn2_fwd_with_states(q.view(heads), g.view(heads), v, None, s)
    if not backward:
        return o
    q, g = compiled_gates(y, x, lb)
    dq, dg, dv, _ = C.chunk_hgrn2_bwd(q.view(heads), g.view(heads), v, None, do, None, s, st)
    return (o,) + tuple(compiled_gates_bwd(y, x, lb, g, dq.view(y.shape), dg.view(y.shape))) + (dv,)


def b_step(y, x, lb, v, do, s, heads, backward=True):
    q, g = gates_triton(y, x, lb, launch.launcher)
    o, _, st = C.chunk_hgrn2_fwd_with_states(q.view(heads), g.view(heads), v, None, s)
    if not backward:
        return o
    q, g = gates_triton(y, x, lb, launch.launcher)
    logits = (y.view(heads), x.view(heads), lb)
    dy, dx, dlb, dv, _ = C.chunk_hgrn2_bwd(q.view(heads), g.view(heads), v, None, do, None, s, st, logits)
    return o, dy.view(y.shape), dx.view(y.shape), dlb, dv


def main():
    steps = {"A": a_step, "B": b_step, "A fwd": functools.partial(a_step, backward=False),
             "B fwd": functools.partial(b_step, backward=False)}
    for shape in (sys.argv[1] if len(sys.argv) > 1 else "8x2048x8,2x8192x8").split(","):
        B, T, H = (int(t) for t in shape.split("x"))
        K = 128
        torch.manual_seed(0)
        y = torch.randn(B, T, H * K, device="cuda", dtype=torch.bfloat16)
        x = (torch.randn(B, T, H * K, device="cuda") + 2).bfloat16()
        lb = torch.rand(H * K, device="cuda") * 0.5
        v = torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16)
        do = torch.randn_like(v)
        args = (y, x, lb, v, do, K**-0.5, (B, T, H, K))
        diff = [((b.float() - a.float()).norm() / a.float().norm()).item()
                for a, b in zip(a_step(*args), b_step(*args))]
        graphs = {}
        for name, f in steps.items():
            for _ in range(2):
                f(*args)
            torch.cuda.synchronize()
            graphs[name] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[name]):
                f(*args)
        times = {name: [] for name in graphs}
        for _ in range(7):
            for name, graph in graphs.items():
                times[name].append(do_bench(graph.replay, warmup=25, rep=100))
        med = {name: statistics.median(t) for name, t in times.items()}
        ratio = statistics.median(b / a for a, b in zip(times["A"], times["B"]))
        print(f"{shape}: fwd+bwd A {med['A']:.3f} B {med['B']:.3f} ms (B/A {ratio:.3f}); fwd A {med['A fwd']:.3f} "
              f"B {med['B fwd']:.3f}; B against A, relative (o, dq_logits, df_logits, dlb, dv): "
              f"{[f'{e:.1e}' for e in diff]}", flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for name in ("A", "B"):
                for _ in range(5):
                    graphs[name].replay()
                torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14), flush=True)


if __name__ == "__main__":
    main()

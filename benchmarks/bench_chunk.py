"""The HGRN2 recurrence op against fla's chunk_gla and causal SDPA, side by side in one run.

    python benchmarks/bench_chunk.py [--out DIR] [--quick] [--shapes 0,1,2] [--no-slow] [--rounds 3] [--results FILE]

The table is printed, appended (with date, device, versions and the command) to --results
(default benchmarks/RESULTS.md beside this script; --results "" to skip) and, with --out, written
to DIR/bench_chunk.md and DIR/bench_chunk.json.

--shapes picks rows of SHAPES by index (fla autotunes each new shape for a minute or more on a
fresh machine, so all of them with fla may not fit one device call).

Inputs as HGRN2 feeds them: q, v bf16 [B, T, H, K]; g fp32 = logsigmoid(randn) (the layer-0 gate);
fla gets k = 1 - exp(g) in bf16 as a leaf (as shared/anchors measured it, which spares fla the
key's backward); SDPA gets [B, H, T, D] bf16, causal. Times are triton.testing.do_bench medians in
ms (CUDA events). Every input set here is at least 96 MB, over the H100's 50 MB L2, so repeated
calls do not run from cache.

Each call is timed two ways: eager (do_bench over the Python calls, what an eager user sees) and
as GPU time (the summed durations of the kernels one call runs, from torch.profiler). Eager
timings on the H100 swing by up to ~1.4x from one do_bench to the next on the same buffers
(benchmarks/same_buffers.py, 2026-11-24): the host side (Python dispatch, kernel launches) bounds
them part of the time, for fla as for this op. Kernels are compared by GPU time. (Capturing the
calls in CUDA graphs, as benchmarks/ab_chunk.py does for the raw kernels, failed here for the
autograd backward of the op with torch 2.11.) Each shape is measured in --rounds rounds (default 3), ours, SDPA and
fla in turn within a round; every figure is the median over the rounds, and the JSON keeps each
round's figures.

The memory floor of a shape is the fewest bytes the op must move over the measured copy bandwidth
(read + write): forward reads q, g (fp32), v and writes o; forward+backward adds reading q, g, v, do
and writing dq, dg (fp32), dv.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from hgrn2mini.ops import chunk_hgrn2

DEVICE = "cuda"  # a test runs the script's logic on the CPU with tiny shapes
SHAPES = [  # (B, T, H, K=V)
    (8, 2048, 8, 128),
    (4, 4096, 8, 128),
    (2, 8192, 8, 128),
    (1, 16384, 8, 128),
    (8, 2048, 16, 128),
    (16, 2048, 6, 128),
    (8, 2048, 16, 64),
]


def bench(fn, grad_to_none=None):
    return do_bench(fn, warmup=25, rep=200, return_mode="median", grad_to_none=grad_to_none)


def copy_bandwidth():
    x = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)  # bytes/s, read + write


def kernel_times(fn, reps=20):
    """GPU time per call of each kernel (and copy, fill) that fn runs, ms by name: torch.profiler
    over `reps` calls after one untimed call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / 1e3 / reps for e in prof.key_averages() if e.device_type.name == "CUDA"}


def gpu_time(fn, reps=20):
    """GPU time of one call: the summed durations of its kernels (`kernel_times`). Unlike an eager
    do_bench this does not count the host's dispatch and launch time, which bounds the eager
    figure part of the time."""
    return sum(kernel_times(fn, reps).values())


def fwd_bwd(fn, leaves, gpu=False):
    """(fwd, fwd+bwd) eager do_bench medians; with gpu, also (fwd, fwd+bwd) GPU time (`gpu_time`)."""
    out = fn()
    do = torch.randn_like(out)

    def step():
        fn().backward(do)

    times = (bench(fn), bench(step, grad_to_none=leaves))
    if not gpu:
        return times
    return times + (gpu_time(fn), gpu_time(lambda: torch.autograd.grad(fn(), leaves, do)))


def run_shape(B, T, H, K, bw, fla, gates="logsigmoid", rounds=3):
    """One row: each figure the median over `rounds` rounds (see the module docstring), each
    round's own figures under "rounds"."""
    q, g, v = inputs(B, T, H, K, gates)
    per_round = [run_round(q, g, v, fla, gates) for _ in range(rounds)]
    row = {"B": B, "T": T, "H": H, "K": K, "gates": gates}
    for key in per_round[0]:
        row[key] = statistics.median(x[key] for x in per_round)
    row["rounds"] = per_round
    n = B * T * H
    V = K
    fwd_bytes = n * (K * 2 + K * 4 + V * 2 + V * 2)
    bwd_bytes = n * (K * 2 + K * 4 + V * 2 + V * 2) + n * (K * 2 + K * 4 + V * 2)
    row["floor_fwd"] = fwd_bytes / bw * 1e3
    row["floor_fwdbwd"] = (fwd_bytes + bwd_bytes) / bw * 1e3
    row["ns_per_token_fwdbwd"] = row[_main(row, "ours")] * 1e6 / (B * T)
    return row


def set_config(chunk, base, base_fast, update):
    """chunk.CONFIG = base with `update` applied, and the same keys applied to each per-shape
    override (chunk.FAST = base_fast, updated where an override sets the key), so that what is
    asked for is what runs. For sweeps and A/B runs over launch configurations."""
    chunk.CONFIG.clear()
    chunk.CONFIG.update(base, **update)
    chunk.FAST.clear()  # in place: the kernels read this dict (kernels/settings.py)
    chunk.FAST.update({key: {**over, **{k: x for k, x in update.items() if k in over}}
                       for key, over in base_fast.items()})


def inputs(B, T, H, K, gates="logsigmoid"):
    """The op's leaves q, g, v as HGRN2 feeds them (V = K): q, v bf16, g fp32 logsigmoid(randn),
    or with gates="uniform30" uniform in [-30, 0] (every sub-block on the slow path)."""
    q = torch.randn(B, T, H, K, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, T, H, K, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    if gates == "logsigmoid":
        g = F.logsigmoid(torch.randn(B, T, H, K, device=DEVICE))
    else:
        g = -30 * torch.rand(B, T, H, K, device=DEVICE)
    return q, g.requires_grad_(), v


_KEYS = ("fwd", "fwdbwd", "fwd_gpu", "fwdbwd_gpu")


def _main(row, name):
    """The figure a row compares by: GPU time where measured, else eager."""
    return f"{name}_fwdbwd_gpu" if f"{name}_fwdbwd_gpu" in row else f"{name}_fwdbwd"


def run_round(q, g, v, fla, gates):
    """One round: ours, SDPA and fla in turn, on the same inputs."""
    B, T, H, K = q.shape
    gpu = DEVICE == "cuda"
    row = dict(zip(("ours_" + k for k in _KEYS), fwd_bwd(lambda: chunk_hgrn2(q, g, v)[0], [q, g, v], gpu)))
    if gates == "logsigmoid":
        qs, ks, vs = (torch.randn(B, H, T, K, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
                      for _ in range(3))
        sdpa = fwd_bwd(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True), [qs, ks, vs], gpu)
        row.update(zip(("sdpa_" + k for k in _KEYS), sdpa))
    print("partial", (B, T, H, K), row, flush=True)  # fla's first call autotunes for minutes on a fresh machine
    if fla is not None and gates == "logsigmoid":
        k, gl = fla_leaves(g)
        row.update(zip(("fla_" + k for k in _KEYS),
                       fwd_bwd(lambda: fla(q, k, v, gl, scale=K**-0.5)[0], [q, k, v, gl], gpu)))
    return row


def fla_leaves(g):
    """fla's k and g leaves for our g: k = 1 - exp(g) in bf16 as a leaf (as shared/anchors measured
    it, which spares fla the key's backward) and a copy of g."""
    return (1 - g.detach().exp()).to(torch.bfloat16).requires_grad_(), g.detach().clone().requires_grad_()


def table(rows, bw):
    head = (
        "| B, T, H, K | gates | ours fwd | ours f+b | fla fwd | fla f+b | fla / ours (f+b) | SDPA fwd | SDPA f+b "
        "| floor fwd | floor f+b | ours f+b / floor | ours ns/token (f+b) | eager: ours f+b | eager: fla f+b "
        "| eager: ours f+b, each round |"
    )
    lines = [f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write); times in ms, medians over rounds; GPU time "
             "(summed kernel durations) unless marked eager", "", head]
    lines.append("|" + "|".join(["---"] * 16) + "|")
    f = lambda r, k: f"{r[k]:.3f}" if k in r else "-"
    for r in rows:
        g = "_gpu" if "ours_fwd_gpu" in r else ""
        ours, fla = _main(r, "ours"), _main(r, "fla")
        ratio = f"{r[fla] / r[ours]:.2f}x" if fla in r else "-"
        each = " / ".join(f"{x['ours_fwdbwd']:.3f}" for x in r.get("rounds", []))
        lines.append(
            f"| {r['B']}, {r['T']}, {r['H']}, {r['K']} | {r['gates']} | {f(r, 'ours_fwd' + g)} | {f(r, ours)} "
            f"| {f(r, 'fla_fwd' + g)} | {f(r, fla)} | {ratio} | {f(r, 'sdpa_fwd' + g)} | {f(r, 'sdpa_fwdbwd' + g)} "
            f"| {f(r, 'floor_fwd')} | {f(r, 'floor_fwdbwd')} | {r[ours] / r['floor_fwdbwd']:.1f} "
            f"| {r[ours] * 1e6 / (r['B'] * r['T']):.1f} | {f(r, 'ours_fwdbwd')} | {f(r, 'fla_fwdbwd')} "
            f"| {each} |"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for bench_chunk.json / .md")
    ap.add_argument("--quick", action="store_true", help="only the first shape")
    ap.add_argument("--shapes", help="comma-separated indices into SHAPES (default: all)")
    ap.add_argument("--no-slow", action="store_true", help="skip the all-slow-path gates row")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per shape (median taken)")
    ap.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
                    help="markdown file the table is appended to ('' for none)")
    args = ap.parse_args()
    try:
        from fla.ops.gla import chunk_gla as fla
    except ImportError:
        fla = None
    print(torch.__version__, torch.cuda.get_device_name(), "fla:", fla is not None, flush=True)
    bw = copy_bandwidth()
    rows = []
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shapes:
        shapes = [SHAPES[int(i)] for i in args.shapes.split(",")]
    for shape in shapes:
        rows.append(run_shape(*shape, bw, fla, rounds=args.rounds))
        print(rows[-1], flush=True)
    if not args.no_slow:
        rows.append(run_shape(*SHAPES[0], bw, fla, gates="uniform30", rounds=args.rounds))
    md = table(rows, bw)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_chunk.json"), "w") as fh:
            json.dump({"copy_Bps": bw, "rows": rows, "torch": torch.__version__}, fh, indent=1)
        with open(os.path.join(args.out, "bench_chunk.md"), "w") as fh:
            fh.write(md + "\n")
    if args.results:
        import triton

        fla_version = getattr(sys.modules.get("fla"), "__version__", None)
        head = (f"\n### {datetime.date.today().isoformat()}, `bench_chunk.py` on {torch.cuda.get_device_name()}\n\n"
                f"torch {torch.__version__}, Triton {triton.__version__}, fla {fla_version or 'not installed'}. "
                f"Command: `python benchmarks/bench_chunk.py {' '.join(sys.argv[1:])}`\n\n")
        with open(args.results, "a") as fh:
            fh.write(head + md + "\n")


if __name__ == "__main__":
    main()

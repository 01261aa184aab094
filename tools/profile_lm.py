"""Where the 374M training step's time goes: GPU time per kernel family, and how much of the step
the GPU spends idle (the host not keeping up), for ours compiled whole or by regions.

    python tools/profile_lm.py --mode regions --shapes 8x2048,2x8192 [--trace] [--out DIR]
    python tools/profile_lm.py --mode model --shapes 8x2048

The model is benchmarks/bench_lm.py's (ours, 374M). Per shape, a summary is printed and the full
figures written to DIR/profile_lm_MODE_BxT.json (with --trace also a chrome trace beside it).

Also counts the compile-time cost of reading our Triton kernels: torch generates each user kernel's
Triton IR to learn which arguments it writes, once per call site while tracing and once while
lowering (`generate_ttir`), which a whole-model graph pays per layer. Wall time of the first step
and the time spent in generate_ttir are printed side by side.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_lm import VOCAB, build  # noqa: E402

FAMILIES = (  # first match wins: (family, substrings of the kernel name)
    ("op: state walk", ("_state_kernel", "_segment_kernel", "_fixup_kernel")),
    ("op: out / dv", ("_out_kernel",)),
    ("op: dq / dg", ("_dqg_kernel",)),
    ("optimizer", ("multi_tensor", "fused_adam", "FusedAdam", "adam")),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90_xmma", "xmma", "cublas", "splitK")),
    ("cross-entropy / softmax", ("log_softmax", "nll_loss", "cross_entropy", "softmax")),
    ("inductor fused", ("triton_",)),
    ("copy / fill", ("Memcpy", "Memset", "copy_", "fill_", "elementwise_kernel", "vectorized_elementwise")),
)


def family(name: str) -> str:
    for fam, keys in FAMILIES:
        if any(k in name for k in keys):
            return fam
    return "other"


def count_ttir():
    """Wraps torch's generate_ttir to count its calls and time (module attribute, looked up per call)."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    stats = {"calls": 0, "s": 0.0, "kernels": collections.Counter()}
    orig = tkw.generate_ttir

    def timed(kernel, *a, **kw):
        t = time.perf_counter()
        try:
            return orig(kernel, *a, **kw)
        finally:
            stats["calls"] += 1
            stats["s"] += time.perf_counter() - t
            stats["kernels"][getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))] += 1

    tkw.generate_ttir = timed
    return stats


def run(mode: str, B: int, T: int, steps: int, trace: Path | None = None) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build("ours", T).to("cuda", torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, VOCAB, (B, T), device="cuda")
    m = model.compile_regions(dynamic=False) if mode == "regions" else torch.compile(model, dynamic=False)

    def step():
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ttir = count_ttir()
    t = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    walls = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
    wall = sorted(walls)[len(walls) // 2]
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if trace else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    fams, names = collections.Counter(), collections.Counter()
    for e in prof.key_averages():
        if e.device_type.name == "CUDA":
            ms = e.device_time_total / 1e3 / steps
            fams[family(e.key)] += ms
            names[e.key] += ms
    busy = sum(fams.values())
    host = {}
    if trace:
        prof.export_chrome_trace(str(trace))
        cpu = [e for e in prof.key_averages() if e.device_type.name == "CPU"]
        cpu.sort(key=lambda e: -e.self_cpu_time_total)
        host = {e.key: round(e.self_cpu_time_total / 1e3 / steps, 3) for e in cpu[:30]}
    from torch._dynamo.utils import counters

    dynamo = {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles", "graph_break")}
    return {"mode": mode, "B": B, "T": T, "step_ms": wall * 1e3, "steps_ms": [round(w * 1e3, 1) for w in walls],
            "tok_per_s": B * T / wall,
            "gpu_busy_ms": busy, "idle_ms": wall * 1e3 - busy, "first_step_s": first,
            "ttir_calls": ttir["calls"], "ttir_s": ttir["s"], "ttir_kernels": dict(ttir["kernels"]),
            "families_ms": dict(fams.most_common()), "top_kernels_ms": dict(names.most_common(25)),
            "host_self_ms": host, "dynamo": dynamo}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=("regions", "model"), default="regions",
                   help="model.compile_regions() or torch.compile of the whole model")
    p.add_argument("--shapes", default="8x2048,2x8192", help="BxT, comma-separated")
    p.add_argument("--steps", type=int, default=5, help="timed and profiled steps")
    p.add_argument("--trace", action="store_true", help="also profile the host: top CPU ops, a chrome trace")
    p.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder for the JSON files (env OUT)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for s in args.shapes.split(","):
        B, T = (int(x) for x in s.split("x"))
        trace = out / f"trace_{args.mode}_{B}x{T}.json" if args.trace else None
        r = run(args.mode, B, T, args.steps, trace)
        print(f"{args.mode} {B}x{T}: {r['tok_per_s']:,.0f} tok/s, step {r['step_ms']:.1f} ms, GPU busy "
              f"{r['gpu_busy_ms']:.1f} ms, idle {r['idle_ms']:.1f} ms; first step {r['first_step_s']:.1f} s "
              f"(generate_ttir {r['ttir_calls']} calls, {r['ttir_s']:.1f} s)", flush=True)
        for fam, ms in r["families_ms"].items():
            print(f"  {fam:28} {ms:8.2f} ms")
        for name, ms in list(r["top_kernels_ms"].items())[:12]:
            print(f"    {ms:7.2f}  {name[:100]}")
        print("  steps ms:", r["steps_ms"], "dynamo:", r["dynamo"])
        for name, ms in list(r["host_self_ms"].items())[:20]:
            print(f"    host {ms:7.2f}  {name[:100]}")
        (out / f"profile_lm_{args.mode}_{B}x{T}.json").write_text(json.dumps(r, indent=1) + "\n")
        del r
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

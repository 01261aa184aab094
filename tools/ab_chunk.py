"""A/B of versions of the Triton kernels, interleaved in one process (device machine).

    mkdir /tmp/a && git archive HEAD kernels | tar -x -C /tmp/a
    python tools/ab_chunk.py /tmp/a/kernels [--rounds 9] [--shapes 8x2048x8,2x8192x8] \
        [--configs '[{"dqg_stages": 2}]'] [--dim 128] [--gates uniform30] [--also /tmp/c/kernels ...] \
        [--out DIR]

Versions: A, the kernels/ folder given (or a single chunk.py of a version from before the split);
B, the working tree's `hgrn2mini.kernels`; each of --also (named by its path); and B with each
CONFIG update of --configs. Each runs forward + backward as the op does (the forward's states
kept), K = V = --dim (128), bf16, kernels launched raw (not through wrap_triton, whose dispatch
outside a triton_op costs more than the kernels), captured once in a CUDA graph so that host
overhead is not timed. Each round replays every version's graph under do_bench; the table gives
the median over rounds and the median of the per-round ratios to A (the same call's time drifts
between seconds, so only interleaved ratios compare versions). Then each version's per-kernel GPU
times (torch.profiler, summed per kernel name, mean per call), and B's largest difference from A
relative to A's largest value. The report is printed and, with --out, written to DIR/ab_chunk.txt.
"""

import argparse
import functools
import importlib.util
import json
import os
import statistics
import sys
import types

import torch
from hgrn2mini.kernels import chunk as tree
from hgrn2mini.kernels import launch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run with python -P too
from harness import inputs, kernel_times, set_config  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("old", help="version A: a kernels/ folder (or a pre-split chunk.py)")
p.add_argument("--rounds", type=int, default=9, help="interleaved rounds per shape")
p.add_argument("--shapes", default="8x2048x8,2x8192x8", help="BxTxH, comma-separated")
p.add_argument("--configs", default="[]", help="JSON list of CONFIG updates, each run as a version of B")
p.add_argument("--dim", type=int, default=128, help="K = V")
p.add_argument("--gates", default="logsigmoid", choices=("logsigmoid", "uniform30"), help="gate values")
p.add_argument("--also", action="append", default=[], help="another version's kernels/ (repeatable)")
p.add_argument("--out", default=None, help="folder for ab_chunk.txt (none: print only)")
args = p.parse_args()
lines = []


def say(line):
    print(line, flush=True)
    lines.append(line)


def load(path, name):
    """The chunk module of a version: a kernels/ folder, imported as `hgrn2mini.kernels` in a copy of
    its own (its modules import each other by that name), or one chunk.py file; launches raw."""
    if os.path.isfile(path):
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod._launch = lambda kernel: kernel
        return mod
    saved = {k: m for k, m in sys.modules.items() if k.startswith("hgrn2mini.kernels")}
    for k in saved:
        del sys.modules[k]
    pkg = types.ModuleType("hgrn2mini.kernels")
    pkg.__path__ = [os.path.abspath(path)]
    sys.modules["hgrn2mini.kernels"] = pkg
    try:
        mod = importlib.import_module("hgrn2mini.kernels.chunk")
        importlib.import_module("hgrn2mini.kernels.launch").launcher = lambda kernel: kernel
    finally:
        for k in [k for k in sys.modules if k.startswith("hgrn2mini.kernels")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return mod


old = load(args.old, "chunk_a")
also = [(path, load(path, f"chunk_also{i}")) for i, path in enumerate(args.also)]
versions = ([("A", old, {}), ("B", tree, {})] + [(name, mod, {}) for name, mod in also]
            + [(f"B+{json.dumps(c)}", tree, c) for c in json.loads(args.configs)])
bases = {mod: (dict(mod.CONFIG), dict(mod.FAST)) for _, mod, _ in versions}
launch.launcher = lambda kernel: kernel  # B's raw launches


def run(mod, cfg, q, g, v, do, s):
    """Forward + backward of one version; cfg updates CONFIG and the per-shape overrides (FAST)."""
    set_config(mod, *bases[mod], cfg)
    o, _, states = mod.chunk_hgrn2_fwd_with_states(q, g, v, None, s)
    return (o,) + mod.chunk_hgrn2_bwd(q, g, v, None, do, None, s, states)[:3]


def main():
    for shape in args.shapes.split(","):
        Bn, T, H = (int(x) for x in shape.split("x"))
        K = args.dim
        q, g, v = (x.detach() for x in inputs(Bn, T, H, K, args.gates))
        do = torch.randn_like(v)
        s = K**-0.5
        graphs, outs = [], []
        for _, mod, cfg in versions:
            outs.append(run(mod, cfg, q, g, v, do, s))  # compiles outside the capture
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                run(mod, cfg, q, g, v, do, s)
            graphs.append(graph)
        times = [[] for _ in versions]
        for _ in range(args.rounds):
            for i, graph in enumerate(graphs):
                times[i].append(do_bench(graph.replay, warmup=10, rep=100, return_mode="median"))
        for i, (name, _, _) in enumerate(versions):
            ratios = [a / b for a, b in zip(times[0], times[i])]
            say(f"{shape} {name:40s} fwd+bwd {statistics.median(times[i]):.4f} ms  A/this "
                f"{statistics.median(ratios):.3f} (rounds {' '.join(f'{r:.2f}' for r in ratios)})")
        for name, mod, cfg in versions:
            per = kernel_times(functools.partial(run, mod, cfg, q, g, v, do, s), reps=10)
            say(f"{shape} {name:40s} GPU {sum(per.values()):.4f} ms: "
                + ", ".join(f"{k[:24]} {t:.4f}" for k, t in sorted(per.items(), key=lambda x: -x[1])))
        for i in range(1, len(versions)):
            d = [((b.float() - a.float()).abs().max() / a.float().abs().max()).item() for a, b in zip(outs[0], outs[i])]
            say(f"{shape} {versions[i][0]} vs A, max |diff| / max |A|: o {d[0]:.2e} dq {d[1]:.2e} "
                f"dg {d[2]:.2e} dv {d[3]:.2e}")
        del graphs
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ab_chunk.txt"), "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

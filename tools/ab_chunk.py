"""A/B of versions of the Triton kernels, interleaved in one process (device machine).

    git show HEAD:kernels/chunk.py > /tmp/chunk_a.py
    python tools/ab_chunk.py /tmp/chunk_a.py [--rounds 9] [--shapes 8x2048x8,2x8192x8] \
        [--configs '[{"dqg_stages": 2}]'] [--dim 128] [--gates uniform30] [--also /tmp/chunk_c.py ...] \
        [--out DIR]

Versions: A, the file given; B, the working tree's `hgrn2mini.kernels.chunk`; each file of --also
(named by its file name); and B with each CONFIG update of --configs. Each runs forward + backward
as the op does (the forward's states kept), K = V = --dim (128), bf16, kernels launched raw (not
through wrap_triton, whose dispatch outside a triton_op costs more than the kernels), captured once
in a CUDA graph so that host overhead is not timed. Each round replays every version's graph under
do_bench; the table gives the median over rounds and the median of the per-round ratios to A. The
same call's time drifts by up to ~1.4x between seconds on an H100, so only interleaved ratios
compare versions. Then each version's per-kernel GPU times (torch.profiler, summed per kernel
name, mean per call), and each version's largest difference from A relative to A's largest value.
The report is printed and, with --out, written to DIR/ab_chunk.txt.
"""

import argparse
import functools
import importlib.util
import json
import os
import statistics
import sys

import torch
from hgrn2mini.kernels import chunk as tree
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run with python -P too
from harness import inputs, kernel_times, set_config  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("old", help="version A: a chunk.py file")
p.add_argument("--rounds", type=int, default=9, help="interleaved rounds per shape")
p.add_argument("--shapes", default="8x2048x8,2x8192x8", help="BxTxH, comma-separated")
p.add_argument("--configs", default="[]", help="JSON list of CONFIG updates, each run as a version of B")
p.add_argument("--dim", type=int, default=128, help="K = V")
p.add_argument("--gates", default="logsigmoid", choices=("logsigmoid", "uniform30"), help="gate values")
p.add_argument("--also", action="append", default=[], help="another version's chunk.py (repeatable)")
p.add_argument("--out", default=None, help="folder for ab_chunk.txt (none: print only)")
args = p.parse_args()
lines = []


def say(line):
    print(line, flush=True)
    lines.append(line)


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


old = load(args.old, "chunk_a")
also = [(os.path.basename(path), load(path, f"chunk_also{i}")) for i, path in enumerate(args.also)]
versions = ([("A", old, {}), ("B", tree, {})] + [(name, mod, {}) for name, mod in also]
            + [(f"B+{json.dumps(c)}", tree, c) for c in json.loads(args.configs)])
bases = {mod: (dict(mod.CONFIG), dict(mod.FAST)) for _, mod, _ in versions}
for mod in bases:
    mod._launch = lambda kernel: kernel


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

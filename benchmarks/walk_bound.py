"""How far the op is from 3x fla with its sequential state walks taken as free: per-kernel GPU
times of our op (forward, and forward+backward through autograd, as bench_chunk.py times them)
beside fla's chunk_gla in the same run, and the sums without the walk kernels.

    python benchmarks/walk_bound.py [--shapes 0,4] [--rounds 3]   (device machine, fla importable)

The walks (`_state_kernel`, and `_segment_kernel` / `_fixup_kernel` where the walk is cut into
segments) are the only kernels that step along the sequence; every other kernel is parallel over
chunks. Their time is the most any redesign of the walk (fusing it into the chunk kernels, a
single-pass scan) could save, so "ours without walks" is a lower bound for this kernel design:
if it is above fla / 3, no change to the walk alone reaches 3x. GPU time is the summed kernel
durations (torch.profiler), medians over rounds, as in bench_chunk.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run with python -P too
from bench_chunk import SHAPES, fla_leaves, gpu_time, inputs, kernel_times  # noqa: E402

from hgrn2mini.ops import chunk_hgrn2  # noqa: E402

WALKS = ("_state_kernel", "_segment_kernel", "_fixup_kernel")


def split(times: dict[str, float]) -> tuple[float, float]:
    """(all kernels, all but the walks) in ms."""
    walks = sum(ms for name, ms in times.items() if name.startswith(WALKS))
    total = sum(times.values())
    return total, total - walks


def one_round(B, T, H, K, fla):
    q, g, v = inputs(B, T, H, K)
    do = torch.randn_like(v)
    fwd = kernel_times(lambda: chunk_hgrn2(q, g, v)[0])
    fb = kernel_times(lambda: torch.autograd.grad(chunk_hgrn2(q, g, v)[0], [q, g, v], do))
    row = dict(zip(("fwd", "fwd_nowalk"), split(fwd)))
    row.update(zip(("fb", "fb_nowalk"), split(fb)))
    row["kernels_fb"] = fb
    if fla is not None:
        k, gl = fla_leaves(g)
        row["fla_fb"] = gpu_time(lambda: torch.autograd.grad(fla(q, k, v, gl, scale=K**-0.5)[0], [q, k, v, gl], do))
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="0", help="comma-separated indices into bench_chunk.SHAPES")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    try:
        from fla.ops.gla import chunk_gla as fla
    except ImportError:
        fla = None
    print(torch.__version__, torch.cuda.get_device_name(), "fla:", fla is not None, flush=True)
    print(
        "| B, T, H, K | ours fwd | fwd without walks | ours f+b | f+b without walks | fla f+b | fla / 3 "
        "| fla / ours | fla / ours without walks |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for i in args.shapes.split(","):
        B, T, H, K = SHAPES[int(i)]
        rounds = [one_round(B, T, H, K, fla) for _ in range(args.rounds)]
        med = {key: statistics.median(r[key] for r in rounds) for key in rounds[0] if key != "kernels_fb"}
        fla_fb = med.get("fla_fb", float("nan"))
        print(
            f"| {B}, {T}, {H}, {K} | {med['fwd']:.3f} | {med['fwd_nowalk']:.3f} | {med['fb']:.3f} "
            f"| {med['fb_nowalk']:.3f} | {fla_fb:.3f} | {fla_fb / 3:.3f} | {fla_fb / med['fb']:.2f}x "
            f"| {fla_fb / med['fb_nowalk']:.2f}x |",
            flush=True,
        )
        kernels = rounds[len(rounds) // 2]["kernels_fb"]
        print(
            "    f+b kernels (middle round): "
            + ", ".join(
                f"{name.split('(')[0][:28]} {ms:.4f}" for name, ms in sorted(kernels.items(), key=lambda x: -x[1])
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()

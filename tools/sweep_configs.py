"""Speed of the Triton path over launch settings, at every benchmark shape (GPU).

    python tools/sweep_configs.py [--configs JSON] [--shapes i,j] [--quick] [--out DIR]

Ours only: GPU time (summed kernel durations per call) in ms of the forward and of forward +
backward, and the forward + backward time per token; bf16, g = logsigmoid(randn). Each config is a
dict of CONFIG updates, applied to the per-shape overrides (chunk.FAST) too, so that what is swept
is what runs; configs run one after another (for ratios between versions to the percent,
tools/ab_chunk.py interleaves them). Each config is first checked against the float64 chunked
reference (B=1, T=4096, H=2, K=V=128, half the channels strongly decaying, an initial state and a
final-state gradient) and its relative errors are printed before its times. One JSON line per
result, printed and, with --out, written to DIR/sweep_configs.jsonl.
"""

import argparse
import json
import os
import sys

import torch
from hgrn2mini.kernels import chunk as C

from hgrn2mini.ops import chunk_hgrn2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run with python -P too
from check_shapes import errors  # noqa: E402
from harness import SHAPES, gpu_time, inputs, set_config  # noqa: E402


def op_times(q, g, v):
    """GPU time in ms of the op's forward and of its forward + backward."""
    do = torch.randn_like(v)
    fwd = gpu_time(lambda: chunk_hgrn2(q, g, v)[0])
    return fwd, gpu_time(lambda: torch.autograd.grad(chunk_hgrn2(q, g, v)[0], [q, g, v], do))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", default=os.environ.get("SWEEP_CONFIGS", "[{}]"),
                   help="JSON list of CONFIG updates (env SWEEP_CONFIGS)")
    p.add_argument("--shapes", default=os.environ.get("SWEEP_SHAPES"),
                   help=f"comma-separated indices into {SHAPES} (env SWEEP_SHAPES; none: all)")
    p.add_argument("--quick", action="store_true", help="only the first shape")
    p.add_argument("--out", default=None, help="folder for sweep_configs.jsonl (none: print only)")
    args = p.parse_args()
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES[:1] if args.quick else SHAPES
    base, base_fast = dict(C.CONFIG), dict(C.FAST)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    out = open(os.path.join(args.out, "sweep_configs.jsonl"), "w") if args.out else None  # noqa: SIM115

    def say(record):
        line = json.dumps(record)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    for cfg in json.loads(args.configs):
        set_config(C, base, base_fast, cfg)
        say(dict(cfg=cfg, rel_err_bf16=errors(128, 128, torch.bfloat16, B=1, T=4096, gates="mixed")))
        for B, T, H, K in shapes:
            try:
                fwd, both = op_times(*inputs(B, T, H, K))
            except Exception as e:  # noqa: BLE001 - a config that does not fit is reported, not fatal
                say(dict(cfg=cfg, shape=[B, T, H, K], failed=str(e)[:300]))
                break
            say(dict(cfg=cfg, shape=[B, T, H, K], fwd=round(fwd, 4), fwdbwd=round(both, 4),
                     ns_per_token=round(both * 1e6 / (B * T), 1)))
    if out:
        out.close()


if __name__ == "__main__":
    main()

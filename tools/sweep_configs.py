"""Speed of the Triton path over launch configurations, at every benchmark shape (device machine).

    python benchmarks/sweep_configs.py [--quick | --shapes i,j] [--configs JSON]
                                       (or JSON in env SWEEP_CONFIGS, shapes in SWEEP_SHAPES)

Ours only (fla and SDPA are in bench_chunk.py, whose inputs and timing it uses): GPU time
(summed kernel durations per call, bench_chunk.gpu_time) in ms, fwd and fwd+bwd, and the time per token of
fwd+bwd, bf16, g = logsigmoid(randn). Configs run one after another: for ratios between two
versions to the percent, benchmarks/ab_chunk.py interleaves them. Each config is a dict
of CONFIG updates; they apply to the per-shape overrides (chunk.FAST) too, so what is swept is
what runs. Each config is first checked against the float64 chunked reference (B=1, T=4096, H=2, K=V=128,
half the channels strongly decaying, initial state and final-state gradient: long enough for the
segmented state walk): its relative errors are printed before its times.
"""

import json
import os
import sys

import torch
from hgrn2mini.kernels import chunk as C

from hgrn2mini.ops import chunk_hgrn2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run with python -P too
from bench_chunk import SHAPES, fwd_bwd, inputs, set_config  # noqa: E402
from check_shapes import errors  # noqa: E402

if "--configs" in sys.argv:
    CONFIGS = json.loads(sys.argv[sys.argv.index("--configs") + 1])
else:
    CONFIGS = json.loads(os.environ.get("SWEEP_CONFIGS", "[{}]"))
if "--quick" in sys.argv:
    SHAPES = SHAPES[:1]
picked = sys.argv[sys.argv.index("--shapes") + 1] if "--shapes" in sys.argv else os.environ.get("SWEEP_SHAPES")
if picked:
    SHAPES = [SHAPES[int(i)] for i in picked.split(",")]
base = dict(C.CONFIG)
base_fast = dict(C.FAST)


for cfg in CONFIGS:
    set_config(C, base, base_fast, cfg)
    print(json.dumps(dict(cfg=cfg, rel_err_bf16=errors(128, 128, torch.bfloat16, B=1, T=4096, gates="mixed"))),
          flush=True)
    for B, T, H, K in SHAPES:
        q, g, v = inputs(B, T, H, K)
        try:
            # GPU time: eager timings swing with the host (bench_chunk.py).
            fwd, both = fwd_bwd(lambda q=q, g=g, v=v: chunk_hgrn2(q, g, v)[0], [q, g, v], gpu=True)[2:]
        except Exception as e:  # noqa: BLE001 - a config that does not fit is reported, not fatal
            print(cfg, (B, T, H, K), "failed", str(e)[:300], flush=True)
            break
        print(json.dumps(dict(cfg=cfg, shape=[B, T, H, K], fwd=round(fwd, 4), fwdbwd=round(both, 4),
                              ns_per_token=round(both * 1e6 / (B * T), 1))), flush=True)

"""Inputs, GPU timing and launch-setting overrides shared by ab_chunk.py and sweep_configs.py.

Not a script; the tools in this folder import it (they put this folder on sys.path, so they also
run with `python -P`).
"""

import torch
import torch.nn.functional as F

SHAPES = [  # (B, T, H, K = V), the op benchmark's shapes: 131k tokens at H = 8, then wider heads, K = 64
    (8, 2048, 8, 128),
    (4, 4096, 8, 128),
    (2, 8192, 8, 128),
    (1, 16384, 8, 128),
    (8, 2048, 16, 128),
    (16, 2048, 6, 128),
    (8, 2048, 16, 64),
]


def inputs(B, T, H, K, gates="logsigmoid", device="cuda"):
    """The op's leaves q, g, v as HGRN2 feeds them (V = K): q, v bf16, g fp32 = logsigmoid(randn);
    with gates="uniform30", g uniform in [-30, 0] (every sub-block on the strong-decay path)."""
    q = torch.randn(B, T, H, K, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, T, H, K, device=device, dtype=torch.bfloat16, requires_grad=True)
    if gates == "logsigmoid":
        g = F.logsigmoid(torch.randn(B, T, H, K, device=device))
    elif gates == "uniform30":
        g = -30 * torch.rand(B, T, H, K, device=device)
    else:
        raise ValueError(f"gates must be 'logsigmoid' or 'uniform30', got {gates!r}")
    return q, g.requires_grad_(), v


def kernel_times(fn, reps=20):
    """GPU time per call of each kernel (and copy, fill) that fn runs, ms by kernel name: torch.profiler
    over `reps` calls after one untimed call. Host-side dispatch and launch time are not counted."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / 1e3 / reps for e in prof.key_averages() if e.device_type.name == "CUDA"}


def gpu_time(fn, reps=20):
    """GPU time of one call of fn in ms: the summed durations of its kernels."""
    return sum(kernel_times(fn, reps).values())


def set_config(chunk, base, base_fast, update):
    """chunk.CONFIG = base with `update` applied, and the same keys applied to each per-shape
    override (chunk.FAST = base_fast, updated where an override sets the key), so that what is
    asked for is what runs."""
    chunk.CONFIG.clear()
    chunk.CONFIG.update(base, **update)
    # In place: the kernels read the dicts of hgrn2mini.kernels.settings, which chunk re-exports.
    chunk.FAST.clear()
    chunk.FAST.update({key: {**over, **{k: x for k, x in update.items() if k in over}} for key, over in base_fast.items()})

"""How the fused decode kernels (`kernels.decode`) are launched: the launch table and its regimes,
the split-K scratch (partial tiles and arrival counters) that launches with SPLIT_K > 1 share,
and the wrappers' argument checks.
"""

from __future__ import annotations

import torch
import triton

DOT_MIN_BATCH = 16  # tl.dot's smallest tile side; below it a tile of rows would be mostly padding

# Launch table: kernel -> regime -> Triton settings. Regimes: "b1" (one row), "small" (2 to
# DOT_MIN_BATCH - 1 rows, BLOCK_B capped at the batch's next power of two), "dot"
# (tl.dot on [BLOCK_B, BLOCK_K] x [BLOCK_K, BLOCK_N] tiles). The elementwise paths keep a
# [BLOCK_B, BLOCK_N, BLOCK_K] fp32 product, so BLOCK_B * BLOCK_N * BLOCK_K / (32 num_warps) is the
# registers a thread holds for it: 4096 elements at 4 warps is 32. SPLIT_K (matvec kernels; 1 where
# absent): the K slices split over that many programs per output tile, summed by the last to finish
# (`decode._split_sum`). Starting points to be swept on the GPU (tools and tests assign into this
# dict's entries; `kernels.decode.LAUNCH` is the same dict).
LAUNCH = {
    # q/f/i: 3 x D outputs. B=1: 4 rows a program gives 3 D / 4 = 768 programs for D = 1024 (about
    # six per SM), each streaming a 512-wide slice of its rows per step.
    "qfi": {"b1": dict(BLOCK_B=1, BLOCK_N=4, BLOCK_K=512, num_warps=4),
            # more rows a program, a shorter K slice: the same 4096-element product
            "small": dict(BLOCK_B=4, BLOCK_N=8, BLOCK_K=128, num_warps=4),
            # 16 batch rows by 64 weight rows, 256 keys a step: two row blocks share each weight
            # tile through L2 (RESULTS.md, the decode sweep)
            "dot": dict(BLOCK_B=16, BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=3)},
    # o_proj: only D outputs over D inputs, the whole row a step: 8 rows a program (128 programs at
    # D = 1024) at 8 warps
    "o": {"b1": dict(BLOCK_B=1, BLOCK_N=8, BLOCK_K=1024, num_warps=8),
          "small": dict(BLOCK_B=4, BLOCK_N=4, BLOCK_K=256, num_warps=4),
          "dot": dict(BLOCK_B=32, BLOCK_N=16, BLOCK_K=128, num_warps=4)},
    # gate + up: I outputs, two weights each: 4 rows (704 programs at I = 2816), about five a SM
    "glu": {"b1": dict(BLOCK_B=1, BLOCK_N=4, BLOCK_K=512, num_warps=4),
            "small": dict(BLOCK_B=4, BLOCK_N=8, BLOCK_K=128, num_warps=4),
            "dot": dict(BLOCK_B=32, BLOCK_N=16, BLOCK_K=128, num_warps=4)},
    # down_proj: D outputs over I inputs: as o_proj, 4 rows a program for enough programs
    "down": {"b1": dict(BLOCK_B=1, BLOCK_N=4, BLOCK_K=1024, num_warps=4),
             "small": dict(BLOCK_B=4, BLOCK_N=4, BLOCK_K=256, num_warps=4),
             "dot": dict(BLOCK_B=32, BLOCK_N=16, BLOCK_K=128, num_warps=4)},
    # recurrence: a [K, BLOCK_V] fp32 state tile a program; B * H * V / BLOCK_V programs. Narrow
    # tiles at small batch (B=1, H=8, V=128, 8 columns: 128 programs), wider once the batch alone
    # fills the GPU.
    "state": {"b1": dict(BLOCK_V=8, num_warps=8),
              "small": dict(BLOCK_V=32, num_warps=4),
              "dot": dict(BLOCK_V=64, num_warps=4)},
}


def launch_settings(kernel: str, B: int) -> dict:
    """LAUNCH[kernel] for batch size B (a copy; BLOCK_B capped by the batch's next power of two)."""
    regime = "b1" if B == 1 else ("small" if B < DOT_MIN_BATCH else "dot")
    s = dict(LAUNCH[kernel][regime])
    if regime == "small" and "BLOCK_B" in s:
        s["BLOCK_B"] = min(s["BLOCK_B"], triton.next_power_of_2(B))
    return s


# device -> (partials fp32, counters int32): the split-K scratch of the launches on that device.
_SCRATCH: dict = {}
_REPLACED: list = []  # scratch grown out of, kept alive: graphs captured earlier still point at it


def split_scratch(device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partials, counters): at least `floats` fp32 and `tiles` int32 on device, the counters zero.

    One pair a device, shared by every split-K launch there: each launch touches it only after
    waiting for the previous kernel (with PDL too) and leaves every counter zero, so launches in
    one stream take turns (launches on two streams at once must not share it). Grown (at least
    doubled) on an eager call. A CUDA graph keeps the pointers it captured, so the pair it replaces
    stays allocated, and a capture cannot grow it: the capture needs an eager call with the same
    shapes and settings first, as `hgrn2mini.decode._graphed` makes before capturing."""
    have = _SCRATCH.get(device)
    if have is not None and have[0].numel() >= floats and have[1].numel() >= tiles:
        return have
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"split-K decode kernels need {floats} partial floats and {tiles} counters on {device}, more than "
            f"allocated ({0 if have is None else have[0].numel()}, {0 if have is None else have[1].numel()}), "
            f"and a CUDA graph capture cannot allocate them: run the same call (the decode step) once eagerly "
            f"before capturing it")
    if have is not None:
        _REPLACED.append(have)
        floats, tiles = max(floats, 2 * have[0].numel()), max(tiles, 2 * have[1].numel())
    _SCRATCH[device] = (torch.empty(floats, dtype=torch.float32, device=device),
                        torch.zeros(tiles, dtype=torch.int32, device=device))
    return _SCRATCH[device]


# Argument checks of the wrappers in kernels.decode


def check_2d(name: str, t: torch.Tensor, rows: int | None, cols: int, dtype: torch.dtype, device) -> None:
    want = f"[{rows if rows is not None else 'B'}, {cols}]"
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor {want}, got {type(t).__name__}")
    if t.dim() != 2 or (rows is not None and t.shape[0] != rows) or t.shape[1] != cols:
        raise ValueError(f"{name} must be {want}, got {list(t.shape)}")
    if t.dtype != dtype or t.device != device:
        raise ValueError(f"{name} must be {dtype} on {device}, got {t.dtype} on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_norm_weight(name: str, w, D: int, device) -> None:
    if w is not None and (not isinstance(w, torch.Tensor) or w.shape != (D,) or w.device != device
                          or not w.is_contiguous()):
        raise ValueError(f"{name} must be None or a contiguous [{D}] tensor on {device}, got "
                         f"{list(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")


def check_x(x) -> tuple[int, int]:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous [B, D] tensor, got "
                         f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    return x.shape

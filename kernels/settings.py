"""Launch settings of the chunk kernels, in one place: which inputs take the Triton path, the
matmul precision per dtype, block sizes, warps and stages. Fixed rather than autotuned: autotune
inside a triton_op fights torch.compile. Why each setting is what it is: kernels/DESIGN.md.
"""

from __future__ import annotations

import torch
import triton.language as tl

_BT, _BC = 64, 16  # steps a chunk; rows of an in-chunk sub-block (the smallest matmul tile)
_FAST_RANGE = 60.0  # exp(60) = 1.1e26 and exp(-60) = 8.8e-27: finite and normal in fp32 and bf16
_DIMS = (16, 32, 64, 128, 256)  # K and V the kernels take: powers of two, 16 the smallest matmul side


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host: `triton.cdiv` is a constexpr function in newer Triton, several
    microseconds a call outside a kernel."""
    return -(-a // b)


def triton_supported(q: torch.Tensor, v: torch.Tensor) -> bool:
    """The Triton path: CUDA bf16 (fp32 up to K = 128) tensors, T > 0, K and V in {16, ..., 256}."""
    # fp16 takes the PyTorch path: it has too little range for the in-chunk factors. fp32 stops at
    # K = 128: at K = 256 its tiles overflow shared memory.
    return (
        q.is_cuda
        and (q.dtype == torch.bfloat16 or (q.dtype == torch.float32 and q.shape[-1] <= 128))
        and q.shape[1] > 0
        and q.shape[-1] in _DIMS
        and v.shape[-1] in _DIMS
    )


def _dot_config(dtype: torch.dtype):
    """Matmul operand dtype and precision, and the precision of fp32-operand matmuls: bf16
    operands (tf32 for fp32 ones) for bf16 inputs; fp32 FMA matmuls for fp32 inputs, the accuracy
    path (3xTF32 gives wrong results at K = 128, V = 16 with Triton 3.6)."""
    if dtype == torch.bfloat16:
        return tl.bfloat16, "tf32", "tf32"
    return tl.float32, "ieee", "ieee"


# Every shape runs CONFIG, checked over all K, V in the shape sweep; FAST overrides it at the shapes
# where the override was checked. Larger key blocks at V = 16 give wrong bf16 outputs (K = 256,
# out_bk 128) and an illegal address (dqg_bk 64) with Triton 3.6: keep overrides to their shapes.
CONFIG = {
    # State walk (state.py): square [state_bs, state_bs] fp32 state tiles; [128, 128] tiles are slower
    # (half the programs, and the join of more segments).
    "state_bs": 64,
    # Two tiles a program side by side over V, so that g (and q, walking back) is read and scanned
    # once for both; "auto": only where segments still bring the paired programs to min_programs.
    "state_pair": "auto",
    "state_warps": 4, "state_stages": 3,  # 4 warps: the paired tiles without spills, faster than 8
    "min_programs": 256,  # about one wave of walking programs (two an SM): fewer leave SMs idle
    # Segments walked in parallel where B*H alone leaves SMs idle (long T, few heads): up to
    # max_segments, each of at least min_segment_chunks chunks (each segment adds to the join).
    "max_segments": 16, "min_segment_chunks": 4,
    # Out / dv kernel (out.py): the setting checked at every K, V; one stage: pipelining its one or
    # two key blocks gains nothing.
    "out_bk": 64, "out_bv": 128, "out_warps": 8, "out_stages": 1,
    # dq/dg kernel (dqg.py): the setting checked at every K, V; 16-key blocks repeat dA = do v^T
    # too often, 128-key ones spill; one stage: pipelining its short value loop gains nothing here.
    "dqg_bk": 32, "dqg_warps": 4, "dqg_stages": 1,
    # Keep the forward's chunk-start states for the backward (hgrn2mini/ops.py): one sequential
    # walk less per backward, for memory of twice q's size (K = V).
    "keep_states": True,
    # The out and dq/dg kernels in two launches (launch.py) where K and V are both at least this:
    # the whole-chunk path alone first needs fewer registers. Below it one launch takes every path
    # (two launches fault at V = 16 with Triton 3.6).
    "two_pass_min_dim": 64,
    # Eager launches on real tensors through each kernel's compiled launcher (launch.py `_Launch`),
    # not Triton's per-call dispatch: the same kernels, less host time a launch.
    "direct_launch": True,
}

# Per-shape overrides of CONFIG, keyed (K, V, dtype), or (K, V, dtype, variant) for one variant of
# the dq/dg kernel: "gated" (gradients carried on through the gates) or "gated_lb" (with a lower
# bound); a variant's entry is looked up first, then the plain one, then CONFIG (`_cfg`).
FAST = {
    # K = V = 128: one 128-key out program a chunk at 4 warps; dq/dg in 64-key programs at 4 warps,
    # 2 stages, for which loading b rather than scanning g leaves the registers.
    (128, 128, torch.bfloat16): {"out_bk": 128, "out_warps": 4, "dqg_bk": 64, "dqg_warps": 4, "dqg_stages": 2},
    # The gated dq/dg with a lower bound (every layer of the model but the first) holds the gate
    # terms too: at 4 warps its 64-key program spills; 8 warps hold it.
    (128, 128, torch.bfloat16, "gated_lb"): {"dqg_warps": 8, "dqg_stages": 1},
    # K = V = 64: the out kernel at 2 warps (more programs per SM); dq/dg in two 32-key programs.
    (64, 64, torch.bfloat16): {"out_warps": 2, "dqg_bk": 32, "dqg_warps": 4},
}


def _cfg(q: torch.Tensor, v: torch.Tensor, key: str, gated: bool = False, has_lb: bool = False):
    """CONFIG[key], overridden by FAST for q's K and dtype and v's V (and the dq/dg variant)."""
    variant = ("gated_lb" if has_lb else "gated") if gated else None
    found = {}
    # Compared, not looked up: under dynamic shapes K and V are SymInts, which do not hash.
    for shape, override in FAST.items():
        K, V, dtype, *rest = shape
        if q.shape[-1] == K and v.shape[-1] == V and q.dtype == dtype and key in override:
            found[rest[0] if rest else None] = override[key]
    for which in (variant, None):
        if which in found:
            return found[which]
    return CONFIG[key]

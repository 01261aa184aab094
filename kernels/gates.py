"""HGRN2's gates from their logits, forward and backward, in PyTorch (inside
`hgrn2mini::gated_chunk_hgrn2` on every device; Inductor fuses them with the ops around them).

    q = silu(q_logits)
    g = log f,  f = lb + (1 - lb) sigmoid(f_logits)            (fp32; lb = 0 without a bound)
      = log1p(-r),  r = 1 - f = (1 - lb) sigmoid(-f_logits)    where r < 1/2 (f near 1)
      = logaddexp(log lb, log1p(-lb) + logsigmoid(f_logits))   elsewhere (f near 0)

Each form is exact to a few ulps of g where it is used. The logaddexp form alone loses g's
relative precision as f -> 1 with a bound well inside (0, 1): log lb and log(1 - lb) + log s are
then both O(1) and their logaddexp cancels to g ~ r. log1p(-r) alone loses it as f -> 0 (r -> 1,
where lb is tiny).

Backward, with s = sigmoid(f_logits) and f = exp(g):

    dq_logits = dq * silu'(q_logits)
    df_logits = dg * (1 - lb) s (1 - s) / f = dg * sigmoid(-f_logits) exp(log1p(-lb) + logsigmoid(f_logits) - g)
    dlb       = sum over tokens of dg * (1 - s) / f = dg * sigmoid(-f_logits) exp(-g)

every exponent <= 0 but the last, which is the gradient's own size; sigmoid(-x) for 1 - s keeps
gates near 1 exact.

On CUDA the forward is one Triton kernel (`gates_triton`: q and g from the logits in one pass,
inside the op, never kept), and the backward's derivative is applied by the recurrence's dq/dg
kernel as it writes (`dqg.py`, GATES), with the helpers below.

The kernels load in their own body and the helpers take values (or load only the bound): torch's
analysis of which arguments a user kernel writes, which torch.compile trusts, reports every
pointer passed to a helper that returns loaded tiles as written, inputs included, and an input
reported written gives wrong results compiled.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from hgrn2mini.kernels.settings import cdiv
from triton.language.extra import libdevice

# Whether Triton's interpreter runs the kernels (CPU tests). Read once, when this module is
# imported, as Triton reads it when the kernels are decorated: the launch path (`launch.py`)
# and the kernels' own constexpr (`_INTERPRET`) follow this one value.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The forget logit that padding gets: sigmoid(1e4) = 1 and log sigmoid(1e4) = 0 exactly in fp32
# (exp(-1e4) underflows to 0), and 1e4 is finite in bf16 and fp16.
MASKED_F_LOGIT = 1e4


def gates(q_logits: torch.Tensor, f_logits: torch.Tensor, lower_bound: torch.Tensor | None):
    """q = silu(q_logits) in q_logits' dtype and g = log f (fp32), as in the module docstring."""
    f = f_logits.float()
    g = F.logsigmoid(f)
    if lower_bound is not None:
        r = (1 - lower_bound) * torch.sigmoid(-f)
        # min(r, 1/2): the branch not taken stays finite, so that autograd through it gives no NaN
        g = torch.where(r < 0.5, torch.log1p(-torch.clamp(r, max=0.5)),
                        torch.logaddexp(lower_bound.log(), torch.log1p(-lower_bound) + g))
    return F.silu(q_logits), g


def gates_bwd(q_logits, f_logits, lower_bound, g, dq, dg):
    """(d q_logits, d f_logits, d lower_bound or None) from dq and dg, given g; lower_bound's
    gradient sums over every dim but the last."""
    x = q_logits.float()
    s = torch.sigmoid(x)
    dq_logits = (dq.float() * s * (1 + x * (1 - s))).to(q_logits.dtype)  # silu'
    f = f_logits.float()
    rest = torch.sigmoid(-f)
    if lower_bound is None:
        return dq_logits, (dg * rest).to(f_logits.dtype), None
    df_logits = dg * rest * torch.exp(torch.log1p(-lower_bound) + F.logsigmoid(f) - g)
    dlb = (dg * rest * torch.exp(-g)).flatten(0, -2).sum(0)
    return dq_logits, df_logits.to(f_logits.dtype), dlb


_INTERPRET = tl.constexpr(_INTERPRETING)


@triton.jit
def _log1p(x):
    """log(1 + x), exact to a few ulps for small x too: libdevice's on the GPU; under the
    interpreter (no libdevice) Goldberg's form, u - 1 being exactly what 1 + x rounded to."""
    if _INTERPRET:
        u = 1.0 + x
        d = u - 1.0
        return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))
    else:
        return libdevice.log1p(x)


@triton.jit
def _sigmoid_terms(f):
    """log sigmoid(f) and sigmoid(-f) of an fp32 tile, from one exp(-|f|) (never overflows)."""
    e = tl.exp(-tl.abs(f))
    return tl.minimum(f, 0.0) - _log1p(e), tl.where(f >= 0.0, e, 1.0) / (1.0 + e)


@triton.jit
def _log_gate(f, lb, cols, HAS_LB: tl.constexpr):
    """g = log(lb + (1 - lb) sigmoid(f)) of an fp32 tile of forget logits [rows, cols], lb[cols]
    the bound (fp32); the forms of `gates`, each exact where it is used."""
    g, rest = _sigmoid_terms(f)
    if HAS_LB:
        bound = tl.load(lb + cols)
        a = tl.log(bound)[None, :]  # -inf where lb = 0: then g = log(1 - lb) + log sigmoid(f) exactly
        b = _log1p(-bound)[None, :] + g
        hi = tl.maximum(a, b)
        r = (1.0 - bound)[None, :] * rest  # 1 - f = (1 - lb) sigmoid(-f_logits)
        # Both forms end in a log1p, taken once of the argument each element's form picks:
        # log1p(-r) where f is near 1, hi + log1p(exp(lo - hi)) elsewhere.
        near_one = r < 0.5
        l1p = _log1p(tl.where(near_one, -tl.minimum(r, 0.5), tl.exp(tl.minimum(a, b) - hi)))
        g = tl.where(near_one, l1p, hi + l1p)
    return g


@triton.jit
def _gates_kernel(q_logits, f_logits, lb, q, g, N, D, HAS_LB: tl.constexpr, BR: tl.constexpr,
                  BD: tl.constexpr):
    """q = silu(q_logits) (their dtype) and g = log f (fp32) of a [BR, BD] tile of [N, D] logits."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    off = rows[:, None] * D + cols[None, :]
    m = rows[:, None] < N
    x = tl.load(q_logits + off, mask=m, other=0.0).to(tl.float32)
    f = tl.load(f_logits + off, mask=m, other=0.0).to(tl.float32)
    tl.store(q + off, (x / (1.0 + tl.exp(-x))).to(q.dtype.element_ty), mask=m)
    tl.store(g + off, _log_gate(f, lb, cols, HAS_LB), mask=m)


def gates_triton(q_logits: torch.Tensor, f_logits: torch.Tensor, lower_bound: torch.Tensor | None, launch):
    """`gates` in one Triton pass, for CUDA logits [..., D] with D a multiple of 16. launch(kernel)
    returns the kernel as the caller launches it (wrap_triton inside a triton_op)."""
    q_logits, f_logits = q_logits.contiguous(), f_logits.contiguous()
    D = q_logits.shape[-1]
    N = q_logits.numel() // D
    q = torch.empty_like(q_logits)
    g = torch.empty(q_logits.shape, device=q_logits.device, dtype=torch.float32)
    lb = lower_bound.contiguous() if lower_bound is not None else q_logits  # never read then; never an output
    # 8 x 128 elements a program at 4 warps, 8 a thread: few registers, so that many programs share
    # an SM and hide each other's loads (the fastest of rows 4-64 x warps 2-8 on the H200, RESULTS.md).
    BR, BD = 8, (128 if D % 128 == 0 else 16)
    launch(_gates_kernel)[(cdiv(N, BR), D // BD)](q_logits, f_logits, lb, q, g, N, D, HAS_LB=lower_bound is not None,
                                                  BR=BR, BD=BD, num_warps=4)
    return q, g

"""HGRN2's gates from their logits, forward and backward: the PyTorch reference (the CPU path)
and one elementwise Triton kernel each way (the CUDA path of `hgrn2mini::gated_chunk_hgrn2`).

    q = silu(q_logits)
    g = log f,  f = lb + (1 - lb) sigmoid(f_logits)            (fp32; lb = 0 without a bound)
      = log1p(-r),  r = 1 - f = (1 - lb) sigmoid(-f_logits)    where r < 1/2 (f near 1)
      = logaddexp(log lb, log1p(-lb) + logsigmoid(f_logits))   elsewhere (f near 0)

Each form is exact to a few ulps of g where it is used. The logaddexp form alone (fla's, and this
library's until 2026-11-24) loses g's relative precision as f -> 1 with a bound well inside
(0, 1): log lb and log(1 - lb) + log s are then both O(1) and their logaddexp cancels to g ~ r,
so g = -1e-6 came out with ~10% error in fp32 (k = 1 - f with it). log1p(-r) alone would lose
it as f -> 0 (r -> 1, where lb is tiny).
Backward, with s = sigmoid(f_logits) and f = exp(g):

    dq_logits = dq * silu'(q_logits)
    df_logits = dg * (1 - lb) s (1 - s) / f = dg * sigmoid(-f_logits) exp(log1p(-lb) + logsigmoid(f_logits) - g)
    dlb       = sum over tokens of dg * (1 - s) / f = dg * sigmoid(-f_logits) exp(-g)

every exponent <= 0 but the last, which is the gradient's own size; sigmoid(-x) for 1 - s keeps
gates near 1 exact.

Why kernels: in the training step's backward the gates are recomputed (keeping the fp32 g per
layer would cost 3x a projection's bytes), and Inductor, left to itself, recomputed the log-space
gate in four kernels around the recurrence's backward (H100, torch 2.11, 2026-11-24). Here the
recompute is one kernel (q, g for the recurrence's backward) and the derivative one more, each
reading the bf16 logits once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency; keep the CPU path importable
    triton = None


def gates_ref(q_logits: torch.Tensor, f_logits: torch.Tensor, lower_bound: torch.Tensor | None):
    """q = silu(q_logits) in q_logits' dtype and g = log f (fp32), as in the module docstring."""
    f = f_logits.float()
    g = F.logsigmoid(f)
    if lower_bound is not None:
        r = (1 - lower_bound) * torch.sigmoid(-f)
        # min(r, 1/2): the branch not taken stays finite, so that autograd through it gives no NaN
        g = torch.where(r < 0.5, torch.log1p(-torch.clamp(r, max=0.5)),
                        torch.logaddexp(lower_bound.log(), torch.log1p(-lower_bound) + g))
    return F.silu(q_logits), g


def gates_bwd_ref(q_logits, f_logits, lower_bound, g, dq, dg):
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


if triton is not None:

    @triton.jit
    def _log1p(x):
        # log(1 + x) to a few ulps for small x too (Goldberg): u - 1 is exactly what 1 + x rounded to.
        u = 1.0 + x
        d = u - 1.0
        return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))

    @triton.jit
    def _gate_terms(q_logits, f_logits, lb, rows, cols, N, D, HAS_LB: tl.constexpr):
        """Loads one [BR, BD] tile of both logits; returns x, f (fp32), log sigmoid(f), g and the
        mask, and log1p(-lb) ([BD]) for bounded gates."""
        m = (rows[:, None] < N) & (cols[None, :] < D)
        off = rows[:, None] * D + cols[None, :]
        x = tl.load(q_logits + off, mask=m, other=0.0).to(tl.float32)
        f = tl.load(f_logits + off, mask=m, other=0.0).to(tl.float32)
        log_s = tl.minimum(f, 0.0) - _log1p(tl.exp(-tl.abs(f)))
        g = log_s
        log1m_lb = tl.zeros_like(cols).to(tl.float32)
        if HAS_LB:
            bound = tl.load(lb + cols, mask=cols < D, other=0.5)
            log1m_lb = _log1p(-bound)
            a = tl.log(bound)[None, :]  # -inf where lb = 0: then g = b exactly
            b = log1m_lb[None, :] + log_s
            hi = tl.maximum(a, b)
            r = (1.0 - bound)[None, :] / (1.0 + tl.exp(f))  # 1 - f = (1 - lb) sigmoid(-f_logits)
            g = tl.where(r < 0.5, _log1p(-tl.minimum(r, 0.5)), hi + _log1p(tl.exp(tl.minimum(a, b) - hi)))
        return x, f, log_s, g, m, off, log1m_lb

    @triton.jit
    def _gates_kernel(q_logits, f_logits, lb, q, g_out, N, D, HAS_LB: tl.constexpr, BR: tl.constexpr,
                      BD: tl.constexpr):
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        x, f, log_s, g, m, off, _ = _gate_terms(q_logits, f_logits, lb, rows, cols, N, D, HAS_LB)
        tl.store(q + off, (x / (1.0 + tl.exp(-x))).to(q.dtype.element_ty), mask=m)
        tl.store(g_out + off, g, mask=m)

    @triton.jit
    def _gates_bwd_kernel(q_logits, f_logits, lb, dq, dg, dq_logits, df_logits, dlb_part, N, D,
                          HAS_LB: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
        """dlb_part [row blocks, D]: each program's sum over its rows (summed after, in order)."""
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        x, f, log_s, g, m, off, log1m_lb = _gate_terms(q_logits, f_logits, lb, rows, cols, N, D, HAS_LB)
        s = 1.0 / (1.0 + tl.exp(-x))
        dqv = tl.load(dq + off, mask=m, other=0.0).to(tl.float32)
        tl.store(dq_logits + off, (dqv * s * (1.0 + x * (1.0 - s))).to(dq_logits.dtype.element_ty), mask=m)
        rest = 1.0 / (1.0 + tl.exp(f))  # sigmoid(-f)
        dgv = tl.load(dg + off, mask=m, other=0.0)
        if HAS_LB:
            tl.store(df_logits + off, (dgv * rest * tl.exp(log1m_lb[None, :] + log_s - g)).to(
                df_logits.dtype.element_ty), mask=m)
            part = tl.sum(tl.where(m, dgv * rest * tl.exp(-g), 0.0), 0)
            tl.store(dlb_part + tl.program_id(0) * D + cols, part, mask=cols < D)
        else:
            tl.store(df_logits + off, (dgv * rest).to(df_logits.dtype.element_ty), mask=m)


_BR, _BD = 32, 128


def _grid(N: int, D: int):
    return (triton.cdiv(N, _BR), triton.cdiv(D, _BD))


def gates_fwd(q_logits, f_logits, lower_bound, launch):
    """Triton: `gates_ref` for contiguous CUDA logits [..., D]. launch(kernel) returns the kernel
    as the caller launches it (wrap_triton inside a triton_op)."""
    D = q_logits.shape[-1]
    N = q_logits.numel() // D
    q = torch.empty_like(q_logits)
    g = torch.empty(q_logits.shape, device=q_logits.device, dtype=torch.float32)
    # Without a bound the kernel never reads lb: any input stands in, never an output (an input
    # aliasing an output the kernel writes made torch.compile's copy of the kernel write garbage).
    lb = lower_bound if lower_bound is not None else q_logits
    launch(_gates_kernel)[_grid(N, D)](q_logits, f_logits, lb, q, g, N, D, HAS_LB=lower_bound is not None,
                                       BR=_BR, BD=_BD, num_warps=4)
    return q, g


def gates_bwd(q_logits, f_logits, lower_bound, dq, dg, launch):
    """Triton: `gates_bwd_ref` (g recomputed in the kernel) for contiguous CUDA tensors."""
    D = q_logits.shape[-1]
    N = q_logits.numel() // D
    dq_logits, df_logits = torch.empty_like(q_logits), torch.empty_like(f_logits)
    grid = _grid(N, D)
    has_lb = lower_bound is not None
    part = torch.empty(grid[0] if has_lb else 0, D, device=q_logits.device, dtype=torch.float32)
    lb = lower_bound if has_lb else q_logits  # as in gates_fwd: never an output
    launch(_gates_bwd_kernel)[grid](q_logits, f_logits, lb, dq, dg, dq_logits, df_logits, part, N, D,
                                    HAS_LB=has_lb, BR=_BR, BD=_BD, num_warps=4)
    return dq_logits, df_logits, (part.sum(0) if has_lb else None)

"""HGRN2's gates from their logits, forward and backward, in PyTorch (inside
`hgrn2mini::gated_chunk_hgrn2` on every device; Inductor fuses them with the ops around them).

    q = silu(q_logits)
    g = log f,  f = lb + (1 - lb) sigmoid(f_logits)            (fp32; lb = 0 without a bound)
      = log1p(-r),  r = 1 - f = (1 - lb) sigmoid(-f_logits)    where r < 1/2 (f near 1)
      = logaddexp(log lb, log1p(-lb) + logsigmoid(f_logits))   elsewhere (f near 0)

Each form is exact to a few ulps of g where it is used. The logaddexp form alone (this
library's until 2026-11-24) loses g's relative precision as f -> 1 with a bound well inside
(0, 1): log lb and log(1 - lb) + log s are then both O(1) and their logaddexp cancels to g ~ r;
in fp32, g near -2e-7 came out ~10% off (test_gates_match_float64 found it). log1p(-r) alone
would lose it as f -> 0 (r -> 1, where lb is tiny).

Backward, with s = sigmoid(f_logits) and f = exp(g):

    dq_logits = dq * silu'(q_logits)
    df_logits = dg * (1 - lb) s (1 - s) / f = dg * sigmoid(-f_logits) exp(log1p(-lb) + logsigmoid(f_logits) - g)
    dlb       = sum over tokens of dg * (1 - s) / f = dg * sigmoid(-f_logits) exp(-g)

every exponent <= 0 but the last, which is the gradient's own size; sigmoid(-x) for 1 - s keeps
gates near 1 exact.

A Triton version of both (one elementwise kernel each way) matched float64 eagerly on the H100
but gave wrong results under torch.compile with torch 2.11 (loss off by 1e-3, gradients wrong;
2026-11-24): it is in the history (commit 8f423a8), not used. A lead, checked offline with torch
2.13 and 2.9.1: torch's analysis of which arguments a user kernel writes (Triton IR) reported
every pointer passed to its helper `_gate_terms`, which loaded the tiles and returned them with
their offsets, as written, inputs included; with the loads in the kernel body it reports exactly
the outputs (as it does for the chunk kernels). So the compiled graph treated the logits (kept for
the backward) and the lower bound (a view of a graph input) as written by the kernel, a path the
chunk kernels never take; that is the first suspect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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

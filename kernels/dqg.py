"""dq and dg of one chunk and block of key channels (reference.py, steps 7 and 8), and with the
gated op's logits the gradients carried on through the gates (gates.py).

Every term is separable over the key channels, so each program takes BK of them. dA = do v^T
(the pair matrix's gradient) is recomputed by each key block's program (K / BK times) rather than
stored; b = cumsum(g) comes from the dv kernel (gcum), because here the scan would come after the
value loop with nothing left to overlap it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hgrn2mini.kernels.gates import _log1p, _sigmoid_terms
from hgrn2mini.kernels.launch import _launch_chunks, _redone, _redone_at
from hgrn2mini.kernels.settings import _BC, _BT, _FAST_RANGE, _cfg, _dot_config, cdiv
from hgrn2mini.kernels.tiles import _bad, _exp, _expm1, _head, _load_gcum, _load_tile, _pairs_grad, _store_tile


@triton.jit
def _dqg_chunk(q, g, gcum, v, do, states, dstates, dq, dg, T, H, scale, flags, q_logits, f_logits, lb,
               dlb_part, ik, n, bh, NT,
               K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, PREC32: tl.constexpr,
               FAST_RANGE: tl.constexpr, GENERAL: tl.constexpr, GATES: tl.constexpr, HAS_LB: tl.constexpr):
    """`_dqg_kernel`'s work for chunk n, key block ik of head bh."""
    pid = (bh * NT + n) * (K // BK) + ik
    t0 = n * BT
    rows = tl.arange(0, BT)
    ck = ik * BK + tl.arange(0, BK)
    offk, offv = _head(bh, T, H, K, V)
    st = states + (bh * NT + n) * K * V
    dst = dstates + (bh * NT + n) * K * V
    dA = tl.zeros([BT, BT], dtype=tl.float32)
    dq_h = tl.zeros([BT, BK], dtype=tl.float32)  # do @ h_start^T
    dk_h = tl.zeros([BT, BK], dtype=tl.float32)  # v @ dh_end^T
    outside = tl.zeros([BK], dtype=tl.float32)  # rowsum(dh_end * h_start)
    for iv in range(0, V // BV):
        cv = iv * BV + tl.arange(0, BV)
        vc = _load_tile(v + offv, t0, T, H * V, rows, cv).to(DT)
        doc = _load_tile(do + offv, t0, T, H * V, rows, cv).to(DT)
        h = tl.load(st + ck[:, None] * V + cv[None, :])
        dh = tl.load(dst + ck[:, None] * V + cv[None, :])
        dA += tl.dot(doc, tl.trans(vc), input_precision=PREC)
        dq_h += tl.dot(doc, tl.trans(h.to(DT)), input_precision=PREC)
        dk_h += tl.dot(vc, tl.trans(dh.to(DT)), input_precision=PREC)
        outside += tl.sum(h.to(tl.float32) * dh.to(tl.float32), 1)
    # q, g and b loaded after the value loop, not before it (their tiles would be live across it),
    # and all issued before any is used, so that their loads overlap. b comes from the dv kernel
    # (gcum): here a scan of g would come after the value loop, with nothing left to overlap it.
    q_tile = _load_tile(q + offk, t0, T, H * K, rows, ck)
    gc = _load_tile(g + offk, t0, T, H * K, rows, ck)
    b, b_last = _load_gcum(gcum + offk, t0, T, H * K, rows, ck, BT)
    qs = q_tile.to(tl.float32) * scale
    k = -_expm1(gc)
    # Pairs j < i through _pairs_grad; the diagonal (decay exp(0) = 1) on its own, so that dg
    # below never cancels it (see chunk_hgrn2_bwd_ref).
    diag = tl.sum(tl.where(rows[:, None] == rows[None, :], dA, 0.0), 1)
    dA = tl.where(rows[:, None] > rows[None, :], dA, 0.0)
    # dq_sum = exp(b) dq_h + (pairs), so that dq = scale * (dq_sum + diag k).
    dq_sum, dk_h, dk_in = _pairs_grad(qs, k, gc, b, b_last, dA, dq_h, dk_h, rows, DT, PREC, BT, BC, BK,
                                      FAST_RANGE, GENERAL)
    dqc = scale * (dq_sum + diag[:, None] * k)
    dkc = dk_h + dk_in + diag[:, None] * qs
    # sum over j < t of k_j dk_h_j: a strictly lower-triangular matmul instead of an inclusive
    # cumsum minus the row (which would cancel when the row dominates).
    before = (rows[:, None] > rows[None, :]).to(tl.float32)
    keys_before = tl.dot(before, k * dk_h, input_precision=PREC32)
    later = tl.cumsum(qs * dq_sum - k * dk_in, 0, reverse=True)
    dgc = _exp(b_last)[None, :] * outside[None, :] + keys_before + later - _exp(gc) * dkc
    if GATES:  # on through the gates to their logits (`gates_bwd`)
        x = _load_tile(q_logits + offk, t0, T, H * K, rows, ck).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-x))
        dqc = dqc * sig * (1.0 + x * (1.0 - sig))  # silu'
    # dq stored before dg's gate terms are formed: fewer tiles live at once (the bounded variant
    # spills otherwise).
    _store_tile(dq + offk, dqc, t0, T, H * K, rows, ck)
    if GATES:
        f = _load_tile(f_logits + offk, t0, T, H * K, rows, ck).to(tl.float32)
        log_s, rest = _sigmoid_terms(f)  # log sigmoid(f), sigmoid(-f)
        if HAS_LB:
            cols = (bh % H) * K + ck
            dlb = tl.where(((t0 + rows) < T)[:, None], dgc * rest * tl.exp(-gc), 0.0)
            tl.store(dlb_part + ((bh // H) * NT + n) * H * K + cols, tl.sum(dlb, 0))
            log1m_lb = _log1p(-tl.load(lb + cols))
            dgc = dgc * rest * tl.exp(log1m_lb[None, :] + log_s - gc)
        else:
            dgc = dgc * rest
    _store_tile(dg + offk, dgc, t0, T, H * K, rows, ck)
    if not GENERAL:
        tl.store(flags + pid, _bad(b_last, FAST_RANGE))


@triton.jit
def _dqg_kernel(
    q, g, gcum, v, do,  # [B, T, H, K] / [B, T, H, V]; gcum [B, T, H, K] fp32 (`_load_gcum`)
    states, dstates,  # [B*H, NT, K, V]: chunk-start states; gradients of chunk-end states
    dq, dg,  # out: [B, T, H, K] (q's dtype), [B, T, H, K] fp32; GATES: d q_logits, d f_logits (q's dtype)
    T, H, scale, flags,  # flags as in _out_kernel
    q_logits, f_logits,  # GATES: the gates' logits [B, T, H, K] (q = silu(q_logits), g = log f)
    lb, dlb_part,  # GATES and HAS_LB: the lower bound [H*K] and (out) [B*NT, H*K] fp32 sums per chunk
    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, PREC32: tl.constexpr,
    FAST_RANGE: tl.constexpr, GENERAL: tl.constexpr, FLAGGED: tl.constexpr,
    GATES: tl.constexpr, HAS_LB: tl.constexpr, REDO: tl.constexpr,
):
    """dq and dg of one chunk and BK key channels (formulas in chunk_hgrn2_bwd_ref): every
    term is separable over the key channels. Two variants as in `_out_kernel`. The key
    blocks of a chunk are neighbours in the grid, so v and do, which each reads whole, come
    from L2 after the first. b = cumsum(g) within the chunk comes from gcum, as the dv kernel
    stored it (STORE_GCUM)."""
    NT = tl.cdiv(T, BT)
    # Inductor passes Python floats as fp64 scalars (or constexprs): keep every tile fp32.
    scale = tl.cast(scale, tl.float32)
    if FLAGGED:  # as in _out_kernel
        ik, nb, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        fl = _redone(flags, (bh * NT + nb * REDO) * (K // BK) + ik, K // BK, nb * REDO, NT, REDO)
        if tl.max(fl, 0) != 0:
            for r in range(REDO):
                if _redone_at(fl, r, REDO):
                    _dqg_chunk(q, g, gcum, v, do, states, dstates, dq, dg, T, H, scale, flags, q_logits,
                               f_logits, lb, dlb_part, ik, nb * REDO + r, bh, NT,
                               K, V, BT, BC, BK, BV, DT, PREC, PREC32, FAST_RANGE, GENERAL, GATES, HAS_LB)
    else:
        _dqg_chunk(q, g, gcum, v, do, states, dstates, dq, dg, T, H, scale, flags, q_logits, f_logits, lb,
                   dlb_part, tl.program_id(0), tl.program_id(1), tl.program_id(2), NT,
                   K, V, BT, BC, BK, BV, DT, PREC, PREC32, FAST_RANGE, GENERAL, GATES, HAS_LB)


def _run_dqg(q, g, gcum, v, do, states, dstates, scale, logits=None):
    """dq and dg (fp32) through _dqg_kernel; gcum: b = cumsum(g) as the dv kernel stored it.
    logits: (q_logits, f_logits, lower_bound or None), or None; given, returns d q_logits,
    d f_logits (q's dtype) and d lower_bound (or None) instead."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    DT, PREC, PREC32 = _dot_config(q.dtype)
    # Without logits never read: any input stands in (never an output).
    q_logits, f_logits, lower_bound = logits if logits is not None else (q, q, None)
    q_logits, f_logits = q_logits.contiguous(), f_logits.contiguous()
    gated, has_lb = logits is not None, lower_bound is not None
    lb = lower_bound.contiguous() if has_lb else q
    dlb_part = torch.empty(B * cdiv(T, _BT) if has_lb else 0, H * K, device=q.device, dtype=torch.float32)
    dq, dg = torch.empty_like(q), torch.empty_like(f_logits if gated else g)
    # Square state tiles, BV = BK: BK < BV faults (illegal address) or gives wrong bf16 results with
    # Triton 3.6.
    BK = min(K, _cfg(q, v, "dqg_bk", gated, has_lb))
    BV = min(V, BK)
    _launch_chunks(
        _dqg_kernel, (K // BK, cdiv(T, _BT), B * H), q, g, gcum, v, do, states,
        dstates, dq, dg, T, H, scale, q_logits=q_logits, f_logits=f_logits, lb=lb, dlb_part=dlb_part,
        K=K, V=V, BT=_BT, BC=_BC, BK=BK, BV=BV, DT=DT, PREC=PREC, PREC32=PREC32, FAST_RANGE=_FAST_RANGE,
        num_warps=_cfg(q, v, "dqg_warps", gated, has_lb), num_stages=_cfg(q, v, "dqg_stages", gated, has_lb),
        GATES=gated, HAS_LB=has_lb,
    )
    if gated:
        return dq, dg, (dlb_part.sum(0) if has_lb else None)
    return dq, dg

"""The in-chunk pass and the output: one program per chunk and block of value channels.

    forward:  o  = (scale q exp(b)) @ h_start + A @ v          (reference.py, steps 2 and 4)
    dv:       dv = (k exp(b_last - b)) @ dh_end + A^T @ do     (step 6: the same work, transposed)

A, the [BT, BT] in-chunk pair matrix, is built in registers over key blocks (`_pairs_A`) and
never stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hgrn2mini.kernels.launch import _launch_chunks, _redone, _redone_at
from hgrn2mini.kernels.settings import _BC, _BT, _FAST_RANGE, CONFIG, _cfg, _dot_config, cdiv
from hgrn2mini.kernels.state import _join
from hgrn2mini.kernels.tiles import _bad, _expm1, _head, _load_tile, _pairs_A, _store_tile


@triton.jit
def _out_chunk(q, g, gcum, v, states, o, T, H, scale, flags, decay, h_in, NSEG, iv, n, bh, NT,
               K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
               BVO: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, FAST_RANGE: tl.constexpr,
               DV: tl.constexpr, GENERAL: tl.constexpr, JOIN: tl.constexpr, JR: tl.constexpr,
               STORE_GCUM: tl.constexpr):
    """`_out_kernel`'s work for chunk n, value block iv of head bh."""
    pid = (bh * NT + n) * (V // BVO) + iv
    t0 = n * BT
    rows = tl.arange(0, BT)
    cv = iv * BVO + tl.arange(0, BVO)
    offk, offv = _head(bh, T, H, K, V)
    st = states + (bh * NT + n) * K * V
    if JOIN:  # before the body's tiles are live, in slices unrolled so that their loads overlap
        for r in tl.static_range(0, K // JR):
            cj = r * JR + tl.arange(0, JR)
            off = cj[:, None] * V + cv[None, :]
            joined = _join(tl.load(st + off), decay, h_in, bh, n, NT, NSEG, cj, off, K, V)
            tl.store(st + off, joined.to(states.dtype.element_ty))
        tl.debug_barrier()  # what one thread stored, others read back below
    A = tl.zeros([BT, BT], dtype=tl.float32)
    oc = tl.zeros([BT, BVO], dtype=tl.float32)
    bad = tl.zeros([], dtype=tl.int8)
    for kb in range(0, K // BK):
        ck = kb * BK + tl.arange(0, BK)
        qs = _load_tile(q + offk, t0, T, H * K, rows, ck).to(tl.float32) * scale
        gc = _load_tile(g + offk, t0, T, H * K, rows, ck)
        b = tl.cumsum(gc, 0)
        b_last = tl.sum(gc, 0)
        if STORE_GCUM:
            if iv == 0:
                _store_tile(gcum + offk, b, t0, T, H * K, rows, ck)
        k = -_expm1(gc)
        A_kb, start, end = _pairs_A(qs, k, gc, b, b_last, rows, DT, PREC, BT, BC, BK, FAST_RANGE, GENERAL)
        A += A_kb
        bad = tl.maximum(bad, _bad(b_last, FAST_RANGE))
        if DV:
            x = k * end
        else:
            x = qs * start
        h = tl.load(st + ck[:, None] * V + cv[None, :])
        oc += tl.dot(x.to(DT), h.to(DT), input_precision=PREC)
    vc = _load_tile(v + offv, t0, T, H * V, rows, cv).to(DT)
    if DV:
        oc += tl.dot(tl.trans(A.to(DT)), vc, input_precision=PREC)
    else:
        oc += tl.dot(A.to(DT), vc, input_precision=PREC)
    _store_tile(o + offv, oc, t0, T, H * V, rows, cv)
    if not GENERAL:
        tl.store(flags + pid, bad)


@triton.jit
def _out_kernel(
    q, g, gcum, v, states, o,  # q, g, gcum [B, T, H, K]; v, o [B, T, H, V]; states [B*H, NT, K, V]
    T, H, scale, flags,  # flags [grid size] int8: programs the GENERAL variant redoes
    decay, h_in, NSEG,  # JOIN only: the segmented walk's decays and incoming states, in JR-row slices
    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    BVO: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, FAST_RANGE: tl.constexpr,
    DV: tl.constexpr, GENERAL: tl.constexpr, FLAGGED: tl.constexpr, JOIN: tl.constexpr, JR: tl.constexpr,
    STORE_GCUM: tl.constexpr, REDO: tl.constexpr,
):
    """One chunk, BVO value channels; A built over key blocks in registers, never stored.

    forward:   o  = (scale q exp(b)) @ h_start        + A   @ v     (states: chunk starts)
    DV:        dv = (k exp(b_last - b)) @ dh_end      + A^T @ do    (v is do, o is dv,
                                                                      states: end gradients)
    Launched twice where `_launch_chunks` says so: the first variant takes the whole-chunk
    in-chunk path only and flags the programs whose chunk decays past it; the GENERAL, FLAGGED
    variant redoes those (`_redone`: each of its programs covers REDO chunks) and returns at
    once elsewhere. Else once, GENERAL and not FLAGGED.

    JOIN (first launch only): the states come from a segmented walk, local to their segment;
    each program first makes its own [K, BVO] slice of chunk n's state global (`_join`) in
    place, for itself and the kernels after it: the fixup kernel's work without its separate
    pass over the states (the re-read comes from L2).

    STORE_GCUM (first launch only, DV): the first value block's programs store b = cumsum(g)
    within each chunk to gcum, which the dq/dg kernel after them loads instead of scanning g
    again (`_load_gcum`).
    """
    NT = tl.cdiv(T, BT)
    # Inductor passes Python floats as fp64 scalars (or constexprs): keep every tile fp32.
    scale = tl.cast(scale, tl.float32)
    if FLAGGED:
        iv, nb, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        fl = _redone(flags, (bh * NT + nb * REDO) * (V // BVO) + iv, V // BVO, nb * REDO, NT, REDO)
        if tl.max(fl, 0) != 0:
            for r in range(REDO):
                if _redone_at(fl, r, REDO):
                    _out_chunk(q, g, gcum, v, states, o, T, H, scale, flags, decay, h_in, NSEG, iv, nb * REDO + r,
                               bh, NT, K, V, BT, BC, BK, BVO, DT, PREC, FAST_RANGE, DV, GENERAL, JOIN, JR,
                               STORE_GCUM)
    else:
        _out_chunk(q, g, gcum, v, states, o, T, H, scale, flags, decay, h_in, NSEG, tl.program_id(0),
                   tl.program_id(1), tl.program_id(2), NT, K, V, BT, BC, BK, BVO, DT, PREC, FAST_RANGE, DV, GENERAL,
                   JOIN, JR, STORE_GCUM)


def _run_out(q, g, v, states, scale, dv, join, gcum=None):
    """o (or dv, from do and the state gradients) through _out_kernel; join as `_run_states`
    returns it (a segmented walk's states are made global here, in place). gcum: where to store
    b = cumsum(g) within each chunk (`_out_kernel` STORE_GCUM), or None."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    DT, PREC, _ = _dot_config(q.dtype)
    out, BVO = torch.empty_like(v), min(V, CONFIG["out_bv"])
    BK = min(K, _cfg(q, v, "out_bk"))
    decay, h_in, nseg = join if join else (q, q, 1)  # without a join never read: any input (not an output)
    _launch_chunks(
        _out_kernel, (V // BVO, cdiv(T, _BT), B * H), q, g, gcum if gcum is not None else out, v, states, out,
        T, H, scale, STORE_GCUM=gcum is not None,
        # Slices of 32 rows, unrolled, so that their loads overlap (16-row slices in a loop are slower
        # than the separate fixup kernel the join replaces).
        decay=decay, h_in=h_in, NSEG=nseg, JOIN=bool(join), JR=min(32, K),
        K=K, V=V, BT=_BT, BC=_BC, BK=BK, BVO=BVO, DT=DT, PREC=PREC, FAST_RANGE=_FAST_RANGE, DV=dv,
        num_warps=_cfg(q, v, "out_warps"), num_stages=CONFIG["out_stages"],
    )
    return out

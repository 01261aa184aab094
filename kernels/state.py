"""The state walk: the only pass over the whole sequence, forward (chunk-start states) and in
reverse (chunk-end state gradients), cut into segments walked in parallel where B*H alone leaves
SMs idle, then joined.

Per chunk, with b = cumsum(g) inside it and b_last its last row (reference.py, steps 3 and 5):

    forward:  h  <- exp(b_last) h  + (k exp(b_last - b))^T v
    reverse:  dh <- exp(b_last) dh + (scale q exp(b))^T do

The decay is diagonal in the key channels, so a segment walked from zero is made global by
adding decay[n] * (state entering the segment): `_segment_kernel` walks the segments' ends to
get those incoming states, and `_fixup_kernel` (or the out kernel, JOIN) adds them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from hgrn2mini.kernels import launch
from hgrn2mini.kernels.settings import _BT, CONFIG, _dot_config, cdiv
from hgrn2mini.kernels.tiles import _exp, _expm1, _head, _load_tile


@triton.jit
def _segment(pid, NT, NSEG):
    """Head, segment and chunk range [c0, c1) of program pid where each head's chunks are cut
    into NSEG segments walked in parallel (NSEG = 1: the whole sequence)."""
    per = tl.cdiv(NT, NSEG)
    seg = pid % NSEG
    c0 = seg * per
    return pid // NSEG, seg, c0, tl.minimum(c0 + per, NT)


@triton.jit
def _walk_order(it, c0, c1, REVERSE: tl.constexpr):
    """The chunk a walk reaches at step it, and the segment it starts in: from c0 up and the
    first segment, or from c1 - 1 down and the last (REVERSE)."""
    if REVERSE:
        return c1 - 1 - it
    else:
        return c0 + it


@triton.jit
def _state_kernel(
    q, g, v, h0, states, hT,  # q, g [B, T, H, K]; v (or do) [B, T, H, V]; h0 [B, H, K, V] fp32
    decay, seg_decay,  # SEGMENTED only: [B*H, NT, K], [B*H, NSEG, K] fp32 (out)
    T, H, scale, NSEG,  # states [B*H, NT, K, V] (out); hT [B*H, NSEG, K, V] fp32 (out)
    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, REVERSE: tl.constexpr, HAS_H0: tl.constexpr,
    SEGMENTED: tl.constexpr, PAIR: tl.constexpr,
):
    """Walks the chunks with one [BS, BS] tile of the state in fp32 registers (PAIR: two, side
    by side over the value channels, so that g and q are read and scanned once for both).

    Forward:  h <- exp(b_last) h + (k exp(b_last - b))^T v.
    REVERSE:  dh <- exp(b_last) dh + (scale q exp(b))^T do, from the last chunk (v is do).
    Each state is stored before the chunk updates it: states[n] is the state at the start of
    chunk n (forward) or the gradient at its end (reverse). The last goes to hT (the final
    state, or the gradient of the initial state).

    SEGMENTED: the chunks are cut into NSEG segments walked in parallel, each from zero (the
    first in walking order from h0); the states are then local to the segment, hT holds each
    segment's end, and decay[n] the decay (per key channel) from the segment's start to
    states[n], seg_decay the whole segment's. `_segment_kernel` and `_fixup_kernel` add what
    came from earlier segments: the decay is diagonal, so that is decay[n] * (incoming state).
    """
    ik, iv, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NT = tl.cdiv(T, BT)
    bh, seg, c0, c1 = _segment(pid, NT, NSEG)  # NSEG = 1 unless SEGMENTED
    # Inductor passes Python floats as fp64 scalars: keep every tile fp32.
    scale = tl.cast(scale, tl.float32)
    rows = tl.arange(0, BT)
    ck = ik * BS + tl.arange(0, BS)
    cv = iv * BS * (1 + PAIR) + tl.arange(0, BS)
    offk, offv = _head(bh, T, H, K, V)
    state_off = ck[:, None] * V + cv[None, :]
    h = tl.zeros([BS, BS], dtype=tl.float32)
    h2 = tl.zeros([BS, BS], dtype=tl.float32)
    if HAS_H0:
        first = seg == _walk_order(0, 0, NSEG, REVERSE)  # only the segment walked first starts from h0
        h = tl.where(first, tl.load(h0 + bh * K * V + state_off), 0.0)
        if PAIR:
            h2 = tl.where(first, tl.load(h0 + bh * K * V + state_off + BS), 0.0)
    if SEGMENTED:
        dcum = tl.full([BS], 1.0, dtype=tl.float32)
    for it in range(0, c1 - c0):
        n = _walk_order(it, c0, c1, REVERSE)
        t0 = n * BT
        tl.store(states + (bh * NT + n) * K * V + state_off, h.to(states.dtype.element_ty))
        if PAIR:
            tl.store(states + (bh * NT + n) * K * V + state_off + BS, h2.to(states.dtype.element_ty))
        gc = _load_tile(g + offk, t0, T, H * K, rows, ck)  # rows past T: g = 0 (decay 1, key 0)
        vc = _load_tile(v + offv, t0, T, H * V, rows, cv)
        if PAIR:
            vc2 = _load_tile(v + offv, t0, T, H * V, rows, cv + BS)
        b = tl.cumsum(gc, 0)
        b_last = tl.sum(gc, 0)
        if SEGMENTED:
            tl.store(decay + (bh * NT + n) * K + ck, dcum, mask=ck + iv * K < K)  # one value tile stores it
            dcum = dcum * _exp(b_last)
        if REVERSE:
            x = _load_tile(q + offk, t0, T, H * K, rows, ck).to(tl.float32) * scale * _exp(b)
        else:
            x = -_expm1(gc) * _exp(b_last[None, :] - b)
        xt = tl.trans(x.to(DT))
        chunk_decay = _exp(b_last)[:, None]
        h = chunk_decay * h + tl.dot(xt, vc.to(DT), input_precision=PREC)
        if PAIR:
            h2 = chunk_decay * h2 + tl.dot(xt, vc2.to(DT), input_precision=PREC)
    tl.store(hT + (bh * NSEG + seg) * K * V + state_off, h)
    if PAIR:
        tl.store(hT + (bh * NSEG + seg) * K * V + state_off + BS, h2)
    if SEGMENTED:
        tl.store(seg_decay + (bh * NSEG + seg) * K + ck, dcum, mask=ck + iv * K < K)  # one value tile stores it


@triton.jit
def _segment_at(it, NSEG, ck, REVERSE: tl.constexpr):
    """Step `it` of the walk over the segments: the segment's index, and whether the step is
    one ([len(ck)], False past NSEG). Takes no pointers, so that torch's analysis of what a
    kernel writes, which counts every pointer passed to a call as flowing into what it returns,
    does not see seg_end and seg_decay in the index that `_segment_pass` stores by."""
    return _walk_order(tl.minimum(it, NSEG - 1), 0, NSEG, REVERSE), (ck * 0 + it) < NSEG


@triton.jit
def _segment_load(seg_end, seg_decay, bh, it, NSEG, ck, state_off, K: tl.constexpr, V: tl.constexpr,
                  REVERSE: tl.constexpr):
    """The decay and end state of segment `it` of the walk's order (past NSEG: decay 1, end 0,
    so that passing it changes nothing)."""
    s, live = _segment_at(it, NSEG, ck, REVERSE)
    d = tl.load(seg_decay + (bh * NSEG + s) * K + ck, mask=live, other=1.0)
    e = tl.load(seg_end + (bh * NSEG + s) * K * V + state_off, mask=live[:, None], other=0.0)
    return d, e


@triton.jit
def _segment_pass(h_in, h, bh, it, d, e, NSEG, ck, state_off, K: tl.constexpr, V: tl.constexpr,
                  REVERSE: tl.constexpr):
    """Stores the state entering segment `it` of the walk's order (none past NSEG), returns the
    state leaving it."""
    s, live = _segment_at(it, NSEG, ck, REVERSE)
    tl.store(h_in + (bh * NSEG + s) * K * V + state_off, h, mask=live[:, None])
    return d[:, None] * h + e


@triton.jit
def _segment_kernel(
    seg_end, seg_decay, h_in, hT,  # [B*H, NSEG, K, V], [B*H, NSEG, K], [B*H, NSEG, K, V], [B*H, K, V]
    NSEG, K: tl.constexpr, V: tl.constexpr, BS: tl.constexpr, REVERSE: tl.constexpr,
):
    """The state entering each segment (walking order), from the segments' ends and decays.
    Four segments a step: their loads do not depend on the walk, so all four are issued before
    the first is used (one at a time, each step would wait on its own loads)."""
    ik, iv, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ck = ik * BS + tl.arange(0, BS)
    cv = iv * BS + tl.arange(0, BS)
    state_off = ck[:, None] * V + cv[None, :]
    h = tl.zeros([BS, BS], dtype=tl.float32)
    for it in range(0, NSEG, 4):
        d0, e0 = _segment_load(seg_end, seg_decay, bh, it, NSEG, ck, state_off, K, V, REVERSE)
        d1, e1 = _segment_load(seg_end, seg_decay, bh, it + 1, NSEG, ck, state_off, K, V, REVERSE)
        d2, e2 = _segment_load(seg_end, seg_decay, bh, it + 2, NSEG, ck, state_off, K, V, REVERSE)
        d3, e3 = _segment_load(seg_end, seg_decay, bh, it + 3, NSEG, ck, state_off, K, V, REVERSE)
        h = _segment_pass(h_in, h, bh, it, d0, e0, NSEG, ck, state_off, K, V, REVERSE)
        h = _segment_pass(h_in, h, bh, it + 1, d1, e1, NSEG, ck, state_off, K, V, REVERSE)
        h = _segment_pass(h_in, h, bh, it + 2, d2, e2, NSEG, ck, state_off, K, V, REVERSE)
        h = _segment_pass(h_in, h, bh, it + 3, d3, e3, NSEG, ck, state_off, K, V, REVERSE)
    tl.store(hT + bh * K * V + state_off, h)


@triton.jit
def _join(h, decay, h_in, bh, n, NT, NSEG, ck, state_off, K: tl.constexpr, V: tl.constexpr):
    """A segment-local state tile made global: h + decay[n] * (state entering n's segment),
    in fp32 (see `_state_kernel`, SEGMENTED)."""
    s = n // tl.cdiv(NT, NSEG)
    d = tl.load(decay + (bh * NT + n) * K + ck)
    incoming = tl.load(h_in + (bh * NSEG + s) * K * V + state_off)
    return h.to(tl.float32) + d[:, None] * incoming


@triton.jit
def _fixup_kernel(
    states, decay, h_in,  # [B*H, NT, K, V] (in place), [B*H, NT, K], [B*H, NSEG, K, V] fp32
    T, NSEG, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
):
    """states[n] += decay[n] * (state entering n's segment): local states made global. Used
    where no out kernel reads the states next (the backward walking them again); otherwise
    the out kernel joins them as it loads them (JOIN)."""
    n, bh, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NT = tl.cdiv(T, BT)
    ck = (tile // (V // BS)) * BS + tl.arange(0, BS)
    cv = (tile % (V // BS)) * BS + tl.arange(0, BS)
    state_off = ck[:, None] * V + cv[None, :]
    ptr = states + (bh * NT + n) * K * V + state_off
    x = _join(tl.load(ptr), decay, h_in, bh, n, NT, NSEG, ck, state_off, K, V)
    tl.store(ptr, x.to(states.dtype.element_ty))


def _segments(programs: int, NT: int, min_programs: int) -> int:
    """How many segments to cut each head's walk into: doubling, up to CONFIG max_segments, while
    the doubled programs still fit in one wave (min_programs, about the GPU's slots for them) and
    each segment keeps min_segment_chunks chunks. Not past one wave: two waves of half-length
    segments take as long as one wave of whole ones, and add the join and the segment walks."""
    nseg = 1
    while (nseg * 2 <= CONFIG["max_segments"] and programs * nseg * 2 <= min_programs
           and NT >= 2 * nseg * CONFIG["min_segment_chunks"]):
        nseg *= 2
    return nseg


def walk_plan(heads: int, NT: int, K: int, V: int) -> tuple[int, int, bool]:
    """(segments, state tile side BS, paired tiles) of the walk over NT chunks of B*H = heads
    heads: a function of the sizes and CONFIG alone, computed once per sizes and settings
    (`_walk_plan`); under dynamic shapes (SymInt sizes, which do not hash) computed afresh."""
    settings = tuple(CONFIG[k] for k in _PLAN_KEYS)
    if all(type(x) is int for x in (heads, NT, K, V)):
        return _walk_plan(heads, NT, K, V, settings)
    return _walk_plan.__wrapped__(heads, NT, K, V, settings)


_PLAN_KEYS = ("state_bs", "state_pair", "min_programs", "max_segments", "min_segment_chunks")


@functools.lru_cache(maxsize=4096)
def _walk_plan(heads, NT, K, V, settings):
    # The walk is latency-bound per program: where B * H alone leaves SMs idle, cut the sequence
    # into segments walked in parallel (CONFIG max_segments) and then use smaller state tiles.
    # Square state tiles only: BK < BV faults with Triton 3.6.
    state_bs, state_pair, min_programs, max_segments, _ = settings
    BS = min(K, V, state_bs)

    def programs(bs, paired):  # one per state tile (or pair of tiles) and head, before segments
        return (K // bs) * (V // (bs * (1 + paired))) * heads

    # Pairs halve the programs: "auto" pairs only where segments can make up for it (CONFIG).
    pair = V >= 2 * BS and (state_pair is True or (  # stays so as BS halves
        state_pair == "auto" and programs(BS, True) * max_segments >= min_programs))
    nseg = _segments(programs(BS, pair), NT, min_programs)
    # Smaller tiles (four times the programs) only where the walk fills at most half a wave.
    while BS > 16 and programs(BS, pair) * nseg * 2 <= min_programs:
        BS //= 2
    return nseg, BS, pair


def _run_states(q, g, x, h0, reverse, scale, join_later=False):
    """Chunk-start states (or chunk-end state gradients, x being do), [B*H, NT, K, V] in q's dtype,
    the final state (or d initial state), fp32, and the join: where the walk was segmented and
    join_later, (decay, h_in, nseg) for the out kernel to make the states global as it reads them
    (JOIN), else False (the states are global already)."""
    B, T, H, K = q.shape
    V = x.shape[-1]
    NT = cdiv(T, _BT)
    DT, PREC, _ = _dot_config(q.dtype)
    dev = q.device
    states = torch.empty(B * H, NT, K, V, device=dev, dtype=q.dtype)
    hT = torch.empty(B, H, K, V, device=dev, dtype=torch.float32)
    nseg, BS, pair = walk_plan(B * H, NT, K, V)
    grid = (K // BS, V // (BS * (1 + pair)), B * H * nseg)
    common = dict(K=K, V=V, BT=_BT, BS=BS, DT=DT, PREC=PREC, REVERSE=reverse, HAS_H0=h0 is not None,
                  PAIR=pair, num_warps=CONFIG["state_warps"], num_stages=CONFIG["state_stages"])
    h0_ = h0 if h0 is not None else hT
    if nseg == 1:
        launch.launcher(_state_kernel)[grid](q, g, x, h0_, states, hT, hT, hT, T, H, scale, 1, SEGMENTED=False,
                                             **common)
        return states, hT, False
    seg_end = torch.empty(B * H, nseg, K, V, device=dev, dtype=torch.float32)
    h_in = torch.empty_like(seg_end)
    decay = torch.empty(B * H, NT, K, device=dev, dtype=torch.float32)
    seg_decay = torch.empty(B * H, nseg, K, device=dev, dtype=torch.float32)
    launch.launcher(_state_kernel)[grid](q, g, x, h0_, states, seg_end, decay, seg_decay, T, H, scale, nseg,
                                         SEGMENTED=True, **common)
    launch.launcher(_segment_kernel)[(K // BS, V // BS, B * H)](seg_end, seg_decay, h_in, hT, nseg, K=K, V=V,
                                                                BS=BS, REVERSE=reverse)
    if join_later:
        return states, hT, (decay, h_in, nseg)
    launch.launcher(_fixup_kernel)[(NT, B * H, (K // BS) * (V // BS))](states, decay, h_in, T, nseg, K=K, V=V,
                                                                       BT=_BT, BS=BS)
    return states, hT, False

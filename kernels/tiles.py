"""Tile helpers shared by the chunk kernels (`state.py`, `out.py`, `dqg.py`): exp, tile loads and
stores, and the in-chunk pairs.

In-chunk pairs, exp(b_i - b_j) for j < i, are matmuls of factors with one reference per key
channel: (q_i exp(b_i - m)) . (k_j exp(m - b_j)). With m = b_last / 2 every exponent lies in
[b_last / 2, -b_last / 2], so while a chunk decays by at most 2 * _FAST_RANGE in every channel
the factors are finite normal numbers and the product is exact to rounding: one matmul (`_whole`).
Chunks that decay more take the sub-block path (`_path`, `_block`): a reference per 16-row
sub-block, and if a sub-block itself decays by more than _FAST_RANGE, its pairs are evaluated one
by one in log space (`_near`). The diagonal pairs (exp(0) = 1) are always summed in fp32, never
rounded to bf16. `_pairs_A` (forward, dv) and `_pairs_grad` (dq, dk) take either the whole-chunk
path alone or, GENERAL, every path.
"""

import triton
import triton.language as tl
from hgrn2mini.kernels.gates import _INTERPRET


@triton.jit
def _exp(x):
    """exp of an fp32 tile as one MUFU.EX2 (ex2.approx.ftz). tl.exp emits ex2.approx without
    ftz, which ptxas guards per element with a compare and two multiplies to keep results
    below 2^-126 subnormal; here they flush to 0, and every such value is a decay that only
    scales a sum it cannot change. The interpreter (CPU tests) has no inline PTX: tl.exp."""
    if _INTERPRET:
        return tl.exp(x)
    else:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * 1.4426950408889634],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _expm1(x):
    # Triton has no expm1; exp(x) - 1 loses all digits for |x| << 1 (gates near 1).
    small = tl.abs(x) < 0.1
    taylor = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0)))))
    return tl.where(small, taylor, _exp(x) - 1.0)


@triton.jit
def _row(x, rows, i):
    """Row i of a [BT, D] register tile, as a [D] vector (exact: one term survives the sum)."""
    return tl.sum(tl.where(rows[:, None] == i, x, 0.0), 0)


@triton.jit
def _load_tile(ptr, t0, T, stride, rows, cols):
    """Rows t0 + rows, columns cols of one head of a [B, T, H, D] tensor (ptr at (b, 0, h, 0))."""
    m = (t0 + rows)[:, None] < T
    return tl.load(ptr + (t0 + rows)[:, None] * stride + cols[None, :], mask=m, other=0.0)


@triton.jit
def _head(bh, T, H, K: tl.constexpr, V: tl.constexpr):
    """Offsets of head bh = b * H + h at (b, 0, h, 0) in [B, T, H, K] and [B, T, H, V] tensors."""
    return (bh // H) * T * H * K + (bh % H) * K, (bh // H) * T * H * V + (bh % H) * V


@triton.jit
def _load_gcum(gcum, t0, T, stride, rows, cols, BT: tl.constexpr):
    """b = cumsum(g) within the chunk at t0 ([BT, len(cols)] fp32, as the dv kernel stored it in
    gcum, STORE_GCUM) and b_last, b at the chunk's last step ([len(cols)]); rows past T take
    b_last, as g = 0 there would give."""
    b_last = tl.load(gcum + (tl.minimum(t0 + BT, T) - 1) * stride + cols)
    b = _load_tile(gcum, t0, T, stride, rows, cols)
    return tl.where(((t0 + rows) < T)[:, None], b, b_last[None, :]), b_last


@triton.jit
def _store_tile(ptr, x, t0, T, stride, rows, cols):
    m = (t0 + rows)[:, None] < T
    tl.store(ptr + (t0 + rows)[:, None] * stride + cols[None, :], x.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _is_slow(gc, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, FAST_RANGE: tl.constexpr):
    """Whether some 16-row sub-block decays by more than FAST_RANGE in some channel: the gates'
    cumsum restarted at each sub-block (one scan of the reshaped tile, no row extraction)."""
    sub = tl.cumsum(tl.reshape(gc, (BT // BC, BC, BK)), 1)
    return tl.min(tl.min(tl.min(sub, 2), 1), 0) < -FAST_RANGE


@triton.jit
def _path(gc, b_last, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, FAST_RANGE: tl.constexpr):
    """How a key block's in-chunk pairs are evaluated: (whole, slow, n_sub, size, own).

    Row blocks, each with one reference per channel: the whole chunk with m = b_last / 2 when
    it decays by at most 2 * FAST_RANGE; else 16-row sub-blocks referred to the cumulative gate
    just before them, their own keys included while the sub-block decays by at most
    FAST_RANGE, and otherwise left to a pair-by-pair loop in log space (`slow`). The sub-blocks
    are scanned only in chunks that need it, behind a branch (scanning in every key block, branch
    free, is slower).
    """
    whole = tl.min(b_last, 0) >= -2.0 * FAST_RANGE
    slow = tl.min(b_last, 0) < -1e30  # False, as a tensor: both branches give one type
    if tl.min(b_last, 0) < -2.0 * FAST_RANGE:
        slow = _is_slow(gc, BT, BC, BK, FAST_RANGE)
    n_sub = tl.where(whole, 1, BT // BC)
    size = tl.where(whole, BT, BC)
    own = tl.where(slow, 0, size)  # how many of its own rows a block takes as keys in the matmul
    return whole, slow, n_sub, size, own


@triton.jit
def _block(qs, k, b, b_last, rows, s, size, own, BT: tl.constexpr, DT: tl.constexpr):
    """Matmul factors of row block s: (q exp(b - ref)) and (k exp(ref - b)), both in range."""
    lo = s * size
    ref = 0.5 * b_last
    if size < BT:  # 16-row sub-blocks: the cumulative gate just before this one
        ref = _row(b, rows, lo - 1)  # 0 before the chunk (no row -1)
    in_s = (rows >= lo) & (rows < lo + size)
    keys = rows < lo + own
    eq = _exp(tl.where(in_s[:, None], b - ref[None, :], float("-inf")))
    ek = _exp(tl.where(keys[:, None], ref[None, :] - b, float("-inf")))
    pair = in_s[:, None] & (rows[:, None] > rows[None, :])
    return eq, ek, (qs * eq).to(DT), (k * ek).to(DT), pair


@triton.jit
def _whole(qs, k, b, b_last, DT: tl.constexpr):
    """Matmul factors of the whole chunk referred to m = b_last / 2: (qs exp(b - m)) and
    (k exp(m - b)), in range while the chunk decays by at most 2 * FAST_RANGE; and exp(m)
    ([1, BK]), which turns the first two exponentials into the decays from the chunk start and to
    its end at one multiply each: exp(b) = exp(b - m) exp(m), exp(b_last - b) = exp(m - b) exp(m)."""
    ref = 0.5 * b_last[None, :]
    eq = _exp(b - ref)
    ek = _exp(ref - b)
    return eq, ek, (qs * eq).to(DT), (k * ek).to(DT), _exp(ref)


@triton.jit
def _bad(b_last, FAST_RANGE: tl.constexpr):
    """1 where a key block's chunk decays by more than 2 * FAST_RANGE in some channel (the
    whole-chunk factors leave their range: the GENERAL kernel variant redoes the program)."""
    return (tl.min(b_last, 0) < -2.0 * FAST_RANGE).to(tl.int8)


@triton.jit
def _near(b, k, rows, j, BC: tl.constexpr):
    """Slow path, key j: exp(b_i - b_j) for the rows i > j of its sub-block (else 0), and k_j."""
    bj = _row(b, rows, j)
    near = ((rows // BC) == (j // BC)) & (rows > j)
    return _exp(tl.where(near[:, None], b - bj[None, :], float("-inf"))), _row(k, rows, j)


@triton.jit
def _pairs_A(qs, k, gc, b, b_last, rows, DT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr,
             BC: tl.constexpr, BK: tl.constexpr, FAST_RANGE: tl.constexpr, GENERAL: tl.constexpr):
    """A[i, j] = sum_k qs_i k_j exp(b_i - b_j) for j <= i of one key block (qs = scale * q,
    k, b: [BT, BK] fp32); the diagonal summed in fp32, never rounded to the matmul dtype.
    Not GENERAL: the whole-chunk path only (valid where the chunk decays by at most
    2 * FAST_RANGE, see `_whole`). Also returns exp(b) and exp(b_last - b) ([BT, BK])."""
    A = tl.where(rows[:, None] == rows[None, :], tl.sum(qs * k, 1)[:, None], 0.0)
    if GENERAL:
        whole, slow, n_sub, size, own = _path(gc, b_last, BT, BC, BK, FAST_RANGE)
        for s in range(0, n_sub):
            eq, ek, Qs, Ks, pair = _block(qs, k, b, b_last, rows, s, size, own, BT, DT)
            # Products outside `pair` may overflow to inf: they are discarded, never summed.
            A += tl.where(pair, tl.dot(Qs, tl.trans(Ks), input_precision=PREC), 0.0)
        if slow:
            for j in range(0, BT):
                E, kj = _near(b, k, rows, j, BC)
                col = tl.sum(qs * kj[None, :] * E, 1)
                A += tl.where(rows[None, :] == j, col[:, None], 0.0)
        start, end = _exp(b), _exp(b_last[None, :] - b)
    else:
        eq, ek, Qs, Ks, half = _whole(qs, k, b, b_last, DT)
        A += tl.where(rows[:, None] > rows[None, :], tl.dot(Qs, tl.trans(Ks), input_precision=PREC), 0.0)
        start, end = eq * half, ek * half
    return A, start, end


@triton.jit
def _pairs_grad(qs, k, gc, b, b_last, dA, dq_h, dk_h, rows, DT: tl.constexpr, PREC: tl.constexpr,
                BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, FAST_RANGE: tl.constexpr,
                GENERAL: tl.constexpr):
    """Through the pairs j < i (dA strictly lower, [BT, BT]) of one key block:
    dq[i] = sum_j dA_ij k_j exp(b_i - b_j),  dk[j] = sum_i dA_ij qs_i exp(b_i - b_j);
    with the chunk-start state's and chunk-end gradient's terms (dq_h = do h_start^T and
    dk_h = v dh_end^T, [BT, BK]) returns (exp(b) dq_h + dq, exp(b_last - b) dk_h, dk).
    Not GENERAL: the whole-chunk path only, as in `_pairs_A`. There the first sum is one
    matmul accumulating onto dq_h exp(m), times exp(b - m) after."""
    if GENERAL:
        whole, slow, n_sub, size, own = _path(gc, b_last, BT, BC, BK, FAST_RANGE)
        dq = tl.zeros_like(qs)
        dk = tl.zeros_like(qs)
        for s in range(0, n_sub):
            eq, ek, Qs, Ks, pair = _block(qs, k, b, b_last, rows, s, size, own, BT, DT)
            dAs = tl.where(pair, dA, 0.0).to(DT)
            dq += eq * tl.dot(dAs, Ks, input_precision=PREC)
            dk += ek * tl.dot(tl.trans(dAs), Qs, input_precision=PREC)
        if slow:
            for j in range(0, BT):
                E, kj = _near(b, k, rows, j, BC)
                dAj = tl.sum(tl.where(rows[None, :] == j, dA, 0.0), 1)
                dq += dAj[:, None] * kj[None, :] * E
                dkj = tl.sum(dAj[:, None] * qs * E, 0)
                dk += tl.where(rows[:, None] == j, dkj[None, :], 0.0)
        dq += _exp(b) * dq_h
        dk_h = _exp(b_last[None, :] - b) * dk_h
    else:
        eq, ek, Qs, Ks, half = _whole(qs, k, b, b_last, DT)
        dAs = dA.to(DT)  # strictly lower already
        dq = eq * tl.dot(dAs, Ks, dq_h * half, input_precision=PREC)
        dk_h = ek * (half * dk_h)
        dk = ek * tl.dot(tl.trans(dAs), Qs, input_precision=PREC)
    return dq, dk_h, dk

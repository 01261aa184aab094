"""The chunked HGRN2 recurrence in plain PyTorch: the CPU path of the op and the reference
the Triton kernels (`chunk.py`) are read against.

Per head, with the key tied to the forget gate (k = 1 - f = -expm1(g), g = log f <= 0):

    h_t = exp(g_t)[:, None] * h_{t-1} + k_t[:, None] * v_t[None, :]      h_t: [K, V]
    o_t = (scale * q_t) @ h_t                                               o_t: [V]

Chunked form (chunk of C steps, b = cumsum of g inside the chunk, fp32, decreasing):

    o_i   = (scale q_i * exp(b_i)) @ h_start  +  sum_{j<=i} A_ij v_j
    A_ij  = sum_k scale q_i[k] k_j[k] exp(b_i[k] - b_j[k])                   (j <= i only)
    h_end = exp(b_last)[:, None] * h_start + (k * exp(b_last - b))^T @ v

Every exponent evaluated is <= 0: the pair term is masked to -inf in log space *before* exp,
so strongly decaying gates (g = -30 per step) give exact zeros instead of inf * 0 = NaN.

Backward (do = dL/do, dht = dL/dh_final), with dh_end[n] the gradient of the state at the end of
chunk n coming from later chunks:

    dh_start = exp(b_last) * dh_end + (scale q exp(b))^T @ do
    dq = dq_h + scale * sum_{j<=i} dA_ij k_j exp(b_i - b_j),    dq_h = scale exp(b) * (do @ h_start^T)
    dk = dk_h + sum_{i>=j} dA_ij scale q_i exp(b_i - b_j),       dk_h = exp(b_last - b) * (v @ dh_end^T)
    dv = (k exp(b_last - b)) @ dh_end + A^T @ do,                dA = do v^T

and the gate, from dg_t = exp(g_t) * (rowsum(dh_t * h_{t-1}) - dk_t) split over where dh_t and
h_{t-1} come from (outside the chunk or inside it):

    dg_t = exp(b_last) rowsum(dh_end * h_start)
         + sum_{j<t} k_j dk_h_j  +  sum_{i>=t} q_i dq_h_i
         + sum_{i>=t} (q_i dq'_i - k_i dk'_i)            (dq', dk': pair sums over j < i only)
         - exp(g_t) dk_t

The usual gated-linear-attention form, revcumsum(q*dq - k*dk) plus a carry, is the same sum
but lets O(1) terms (the diagonal pairs, the last key against the chunk-end state) cancel, which
leaves absolute rounding error ~1e-7 on a dg that is ~exp(g): all error when gates are near 0.
Written as above every term carries its own decay, so dg keeps its relative accuracy there, and
no pass over the whole sequence is needed.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.library import wrap_triton

# The pair tensor [C, C, K] per chunk is what the CPU path pays for exactness; against the short
# sequential loop over chunks, C = 8 was fastest on a 2-core CPU (fwd+bwd at B16 T256 H4 K32:
# 0.09 s at C = 8, 0.27 s at 16, 0.67 s at 32).
CHUNK = 8


def _chunked(x: torch.Tensor, C: int) -> torch.Tensor:
    """[B, T, H, D] -> [B, H, N, C, D], zero-padded at the end (g = 0 there: decay 1, key 0)."""
    B, T, H, D = x.shape
    pad = -T % C
    x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x.view(B, (T + pad) // C, C, H, D).permute(0, 3, 1, 2, 4)


def _unchunked(x: torch.Tensor, T: int) -> torch.Tensor:
    B, H, N, C, D = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, D)[:, :T]


def _pair_decay(b: torch.Tensor) -> torch.Tensor:
    """exp(b_i - b_j) for j <= i, exactly 0 above the diagonal: [..., C, K] -> [..., C, C, K]."""
    C = b.shape[-2]
    causal = torch.ones(C, C, dtype=torch.bool, device=b.device).tril()
    diff = b.unsqueeze(-2) - b.unsqueeze(-3)
    return diff.masked_fill(~causal[:, :, None], float("-inf")).exp()


def _acc(x: torch.Tensor) -> torch.Tensor:
    """The accumulation dtype: fp32, or float64 when the reference is asked for in float64."""
    return x if x.dtype == torch.float64 else x.float()


def _prepare(q, g, v, initial_state, scale, C):
    B, _, H, K = q.shape
    acc = _acc(q).dtype
    h0 = _acc(initial_state) if initial_state is not None else q.new_zeros(B, H, K, v.shape[-1], dtype=acc)
    qc, gc, vc = (_chunked(_acc(x), C) for x in (q, g, v))
    b = gc.cumsum(-2)  # [B, H, N, C, K]
    b_last = b[..., -1:, :]  # [B, H, N, 1, K]
    k = -torch.expm1(gc)
    qs = qc * scale
    E = _pair_decay(b)  # [B, H, N, C, C, K]
    A = torch.einsum("...ik,...jk,...ijk->...ij", qs, k, E)  # [B, H, N, C, C]
    ke = k * torch.exp(b_last - b)  # key carried to the chunk end
    return h0, qc, gc, vc, b, b_last, k, qs, E, A, ke


def _chunk_states(h0, b_last, ke, vc):
    """States at every chunk start, [B, H, N, K, V], and the final state."""
    U = ke.transpose(-1, -2) @ vc  # [B, H, N, K, V]
    decay = b_last.exp().transpose(-1, -2)  # [B, H, N, K, 1]
    h, starts = h0, []
    for n in range(U.shape[2]):
        starts.append(h)
        h = decay[:, :, n] * h + U[:, :, n]
    return torch.stack(starts, dim=2), h


def chunk_hgrn2_fwd_ref(q, g, v, initial_state, scale, chunk_size=CHUNK):
    """o [B, T, H, V] in v's dtype and the final state [B, H, K, V] fp32."""
    B, T, H, _ = q.shape
    h0, qc, gc, vc, b, b_last, k, qs, E, A, ke = _prepare(q, g, v, initial_state, scale, chunk_size)
    if T == 0:
        return v.new_empty(B, 0, H, v.shape[-1]), h0.clone()
    starts, h_final = _chunk_states(h0, b_last, ke, vc)
    o = (qs * b.exp()) @ starts + A @ vc  # [B, H, N, C, V]
    return _unchunked(o, T).to(v.dtype), h_final


def chunk_hgrn2_bwd_ref(q, g, v, initial_state, do, dht, scale, chunk_size=CHUNK):
    """Gradients (dq, dg, dv, dh0) of chunk_hgrn2; dht may be None (final state unused)."""
    B, T, H, _ = q.shape
    h0, qc, gc, vc, b, b_last, k, qs, E, A, ke = _prepare(q, g, v, initial_state, scale, chunk_size)
    if T == 0:
        dh0 = _acc(dht).clone() if dht is not None else torch.zeros_like(h0)
        return torch.zeros_like(q), torch.zeros_like(g), torch.zeros_like(v), dh0
    starts, _ = _chunk_states(h0, b_last, ke, vc)
    doc = _chunked(_acc(do), chunk_size)
    N = doc.shape[2]

    # Gradient of each chunk's end state, walking back from the final state's gradient.
    qe = qs * b.exp()
    decay = b_last.exp().transpose(-1, -2)  # [B, H, N, K, 1]
    dh = _acc(dht) if dht is not None else torch.zeros_like(h0)
    ends_grad = []
    for n in reversed(range(N)):
        ends_grad.append(dh)
        dh = decay[:, :, n] * dh + qe[:, :, n].transpose(-1, -2) @ doc[:, :, n]
    dh_end = torch.stack(ends_grad[::-1], dim=2)  # [B, H, N, K, V]
    dh0 = dh

    dA_full = doc @ vc.transpose(-1, -2)  # [B, H, N, C, C]
    dA = dA_full.tril(-1)  # pairs j < i; the diagonal (exp(0) = 1) is added on its own
    diag = dA_full.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # [B, H, N, C, 1]
    dq_pairs = scale * torch.einsum("...ij,...jk,...ijk->...ik", dA, k, E)
    dk_pairs = torch.einsum("...ij,...ik,...ijk->...jk", dA, qs, E)
    dq_h = scale * b.exp() * (doc @ starts.transpose(-1, -2))
    dk_h = torch.exp(b_last - b) * (vc @ dh_end.transpose(-1, -2))
    dq = dq_h + dq_pairs + scale * diag * k
    dk = dk_h + dk_pairs + diag * qs
    dv = ke @ dh_end + A.transpose(-1, -2) @ doc
    outside = b_last.exp() * (dh_end * starts).sum(-1).unsqueeze(-2)  # [B, H, N, 1, K]
    keys_before = F.pad((k * dk_h).cumsum(-2)[..., :-1, :], (0, 0, 1, 0))  # sum over j < t
    later = (qc * (dq_h + dq_pairs) - k * dk_pairs).flip(-2).cumsum(-2).flip(-2)  # sum over i >= t
    dg = outside + keys_before + later - gc.exp() * dk
    return (
        _unchunked(dq, T).to(q.dtype),
        _unchunked(dg, T),
        _unchunked(dv, T).to(v.dtype),
        dh0,
    )



# ---------------------------------------------------------------------------------------------
# Triton kernels
#
# Design (per head; BT = 64 steps a chunk, BC = 16 rows a sub-block, K and V up to 256):
#
#   forward   _intra_kernel       grid (chunks, B*H)     reads q, g          writes A [BT, BT] fp32
#             _state_kernel       grid (V/BV, B*H)       reads q, g, v, A    writes o, final state
#   backward  _state_kernel x2    forward: chunk-start states (q's dtype)
#                                 reverse: gradients of chunk-end states, and d initial state (fp32)
#             _intra_kernel       A again (recomputed, not kept from the forward)
#             _dv_kernel          grid (chunks, B*H, V/BV)   reads g, do, A, dstates      writes dv
#             _dqg_kernel         grid (chunks, B*H, K/BK)   reads q, g, v, do, states, dstates
#                                                            writes dq, dg (fp32)
#   dq and dg split over key channels (every term is separable in k) to keep the live tiles few.
#
# Only `_state_kernel` walks the sequence; it keeps the [K, BV] state in fp32 registers and does
# three matmuls a chunk. Everything else is parallel over chunks. The key k = -expm1(g) and the
# in-chunk cumulative gate b = cumsum(g) (fp32) are recomputed from g wherever they are needed,
# never stored. The states are stored in the input dtype because they only feed matmuls whose
# operands are rounded to it anyway; the final state and d initial state are fp32.
#
# In-chunk pair terms exp(b_i - b_j) (j <= i) are evaluated as matmuls by referring each row
# sub-block s to the cumulative gate r just before it: (q_i exp(b_i - r)) . (k_j exp(r - b_j)).
# For j in earlier sub-blocks both exponents are <= 0. For j in s itself the second exponent is
# >= 0 but bounded by the sub-block's total decay; while that stays <= _FAST_RANGE the factors
# stay finite and normal (fp32 / bf16 range) and the matmul is exact to rounding ("fast path").
# A chunk where some sub-block decays more (gates below about exp(-4) per step over 16 steps)
# takes the slow path: diagonal sub-blocks are evaluated pair by pair in log space, about 10x
# the work of the fast path for that chunk, still exact.
#
# Status (H100, Triton 3.6, 2026-11-23; benchmarks/RESULTS.md): bf16 B=8 T=2048 H=8 K=V=128 takes
# 0.44 ms forward and 1.90 ms forward+backward, about fla's chunk_gla. The sequential state kernel
# has only B*H*V/64 programs, the row extractions (_row) go through shared memory, and the dq/dg
# kernel holds many fp32 tiles: those are the known costs. Triton 3.6 on the H100 faulted or
# miscomputed for state tiles with BK < BV and for 3xTF32 at K=128, V=16; the configurations
# below avoid both, and fp16 (and fp32 at K=256) take the PyTorch path.
# ---------------------------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency; keep the CPU path importable
    triton = None

_FAST_RANGE = 60.0  # exp(60) = 1.1e26 and exp(-60) = 8.8e-27: finite and normal in fp32 and bf16
_BT, _BC = 64, 16
_DIMS = (16, 32, 64, 128, 256)


def triton_supported(q: torch.Tensor, v: torch.Tensor) -> bool:
    """The Triton path: CUDA bf16 (fp32 up to K = 128) tensors, T > 0, K and V in {16, ..., 256}."""
    # fp16 takes the PyTorch path: with fp32 matmul operands (fp16 has too little range for the
    # sub-block factors) K = 128, V = 16 gave wrong outputs on the H100 with Triton 3.6. So does
    # fp32 with K = 256, whose fp32 tiles overflow shared memory.
    return (
        triton is not None
        and q.is_cuda
        and (q.dtype == torch.bfloat16 or (q.dtype == torch.float32 and q.shape[-1] <= 128))
        and q.shape[1] > 0
        and q.shape[-1] in _DIMS
        and v.shape[-1] in _DIMS
    )


if triton is not None:

    @triton.jit
    def _expm1(x):
        # Triton has no expm1; exp(x) - 1 loses all digits for |x| << 1 (gates near 1).
        small = tl.abs(x) < 0.1
        taylor = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0)))))
        return tl.where(small, taylor, tl.exp(x) - 1.0)

    @triton.jit
    def _row(x, rows, i):
        """Row i of a [BT, D] register tile, as a [D] vector (exact: one term survives the sum)."""
        return tl.sum(tl.where(rows[:, None] == i, x, 0.0), 0)

    @triton.jit
    def _load_chunk(ptr, t0, T, HD, rows, D: tl.constexpr):
        """Rows t0..t0+BT of one head of a [B, T, H, D] tensor (ptr already at (b, 0, h, 0))."""
        cols = tl.arange(0, D)
        m = (t0 + rows)[:, None] < T
        return tl.load(ptr + (t0 + rows)[:, None] * HD + cols[None, :], mask=m, other=0.0)

    @triton.jit
    def _is_slow(b, rows, BT: tl.constexpr, BC: tl.constexpr, FAST_RANGE: tl.constexpr):
        """Whether some sub-block decays by more than FAST_RANGE in some channel."""
        worst = 0.0
        for s in tl.static_range(BT // BC):
            if s == 0:
                ref = tl.zeros_like(_row(b, rows, 0))
            else:
                ref = _row(b, rows, s * BC - 1)
            worst = tl.maximum(worst, tl.max(ref - _row(b, rows, s * BC + BC - 1), 0))
        return worst > FAST_RANGE

    @triton.jit
    def _intra(qs, k, b, dA, rows, slow, DT: tl.constexpr, PREC: tl.constexpr,
               BT: tl.constexpr, BC: tl.constexpr, NEED_A: tl.constexpr, NEED_GRAD: tl.constexpr):
        """In-chunk pair terms. qs = scale * q, k, b: [BT, K] fp32; dA = tril(do v^T): [BT, BT].

        A[i, j]   = sum_k qs_i k_j exp(b_i - b_j)                   (j <= i)
        dq[i]     = sum_j dA_ij k_j exp(b_i - b_j)
        dk[j]     = sum_i dA_ij qs_i exp(b_i - b_j)
        """
        causal = rows[:, None] >= rows[None, :]
        A = tl.zeros([BT, BT], dtype=tl.float32)
        dq = tl.zeros_like(qs)
        dk = tl.zeros_like(qs)
        # Sub-blocks whose keys each row block s pairs with through a matmul: all up to s itself on
        # the fast path, only the earlier ones on the slow path.
        last = tl.where(slow, 0, 1)
        for s in tl.static_range(BT // BC):
            if s == 0:
                ref = tl.zeros_like(_row(b, rows, 0))
            else:
                ref = _row(b, rows, s * BC - 1)
            in_s = (rows // BC) == s
            keys = (rows // BC) < s + last
            eq = tl.exp(tl.where(in_s[:, None], b - ref[None, :], float("-inf")))
            ek = tl.exp(tl.where(keys[:, None], ref[None, :] - b, float("-inf")))
            Qs = (qs * eq).to(DT)
            Ks = (k * ek).to(DT)
            pair = in_s[:, None] & causal
            if NEED_A:
                A += tl.where(pair, tl.dot(Qs, tl.trans(Ks), input_precision=PREC), 0.0)
            if NEED_GRAD:
                dAs = tl.where(pair, dA, 0.0).to(DT)
                dq += eq * tl.dot(dAs, Ks, input_precision=PREC)
                dk += ek * tl.dot(tl.trans(dAs), Qs, input_precision=PREC)
        if slow:
            # Diagonal sub-blocks pair by pair: column j against the rows i >= j of its sub-block.
            for j in range(0, BT):
                bj = _row(b, rows, j)
                kj = _row(k, rows, j)
                near = ((rows // BC) == (j // BC)) & (rows >= j)
                E = tl.exp(tl.where(near[:, None], b - bj[None, :], float("-inf")))
                if NEED_A:
                    col = tl.sum(qs * kj[None, :] * E, 1)
                    A += tl.where(rows[None, :] == j, col[:, None], 0.0)
                if NEED_GRAD:
                    dAj = tl.sum(tl.where(rows[None, :] == j, dA, 0.0), 1)
                    dq += dAj[:, None] * kj[None, :] * E
                    dkj = tl.sum(dAj[:, None] * qs * E, 0)
                    dk += tl.where(rows[:, None] == j, dkj[None, :], 0.0)
        return A, dq, dk

    @triton.jit
    def _intra_kernel(
        q, g, A,  # pointers: q, g [B, T, H, K]; A [B*H, NT, BT, BT] fp32 (out)
        T, H, scale,
        K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
        DT: tl.constexpr, PREC: tl.constexpr, FAST_RANGE: tl.constexpr,
    ):
        n, bh = tl.program_id(0), tl.program_id(1)
        NT = tl.cdiv(T, BT)
        off = (bh // H) * T * H * K + (bh % H) * K
        rows = tl.arange(0, BT)
        qc = _load_chunk(q + off, n * BT, T, H * K, rows, K).to(tl.float32)
        gc = _load_chunk(g + off, n * BT, T, H * K, rows, K)
        b = tl.cumsum(gc, 0)
        k = -_expm1(gc)
        slow = _is_slow(b, rows, BT, BC, FAST_RANGE)
        Ac, _, _ = _intra(qc * scale, k, b, qc, rows, slow, DT, PREC, BT, BC, True, False)
        dst = A + ((bh * NT + n) * BT + rows[:, None]) * BT + rows[None, :]
        tl.store(dst, Ac)

    @triton.jit
    def _state_kernel(
        q, g, v, A, o,  # q, g [B, T, H, K]; v (or do) [B, T, H, V]; A fp32; o [B, T, H, V] (out)
        h0, states, hT,  # h0, hT: [B, H, K, V] fp32 (in, out); states [B*H, NT, K, V] (out)
        T, H, scale,
        K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
        DT: tl.constexpr, PREC: tl.constexpr,
        REVERSE: tl.constexpr, HAS_H0: tl.constexpr, STORE_O: tl.constexpr, STORE_STATES: tl.constexpr,
    ):
        """Walks the chunks with the [K, BV] state in fp32 registers.

        Forward:  h <- exp(b_last) h + (k exp(b_last - b))^T v, and o = (qs exp(b)) h + A v.
        REVERSE:  dh <- exp(b_last) dh + (qs exp(b))^T do, walking from the last chunk (v is do).
        Each state is stored before the chunk updates it, so states[n] is the state at the start
        of chunk n (forward) or the gradient at its end (reverse); the last one goes to hT
        (the final state, or the gradient of the initial state).
        """
        iv, bh = tl.program_id(0), tl.program_id(1)
        NT = tl.cdiv(T, BT)
        rows = tl.arange(0, BT)
        kk = tl.arange(0, K)
        cv = iv * BV + tl.arange(0, BV)
        offk = (bh // H) * T * H * K + (bh % H) * K
        offv = (bh // H) * T * H * V + (bh % H) * V + iv * BV
        state_off = kk[:, None] * V + cv[None, :]
        if HAS_H0:
            h = tl.load(h0 + bh * K * V + state_off)
        else:
            h = tl.zeros([K, BV], dtype=tl.float32)
        for it in range(0, NT):
            if REVERSE:
                n = NT - 1 - it
            else:
                n = it
            t0 = n * BT
            if STORE_STATES:
                tl.store(states + (bh * NT + n) * K * V + state_off, h.to(states.dtype.element_ty))
            gc = _load_chunk(g + offk, t0, T, H * K, rows, K)
            b = tl.cumsum(gc, 0)
            b_last = _row(b, rows, BT - 1)
            vc = _load_chunk(v + offv, t0, T, H * V, rows, BV)
            if REVERSE or STORE_O:
                qe = _load_chunk(q + offk, t0, T, H * K, rows, K).to(tl.float32) * scale * tl.exp(b)
            if STORE_O:
                Ac = tl.load(A + ((bh * NT + n) * BT + rows[:, None]) * BT + rows[None, :])
                oc = tl.dot(qe.to(DT), h.to(DT), input_precision=PREC)
                oc += tl.dot(Ac.to(DT), vc.to(DT), input_precision=PREC)
                m = (t0 + rows)[:, None] < T
                tl.store(o + offv + (t0 + rows)[:, None] * (H * V) + tl.arange(0, BV)[None, :],
                         oc.to(o.dtype.element_ty), mask=m)
            if REVERSE:
                x = qe
            else:
                x = -_expm1(gc) * tl.exp(b_last[None, :] - b)
            h = tl.exp(b_last)[:, None] * h + tl.dot(tl.trans(x.to(DT)), vc.to(DT), input_precision=PREC)
        tl.store(hT + bh * K * V + state_off, h)

    @triton.jit
    def _dv_kernel(
        g, do, A, dstates, dv,  # g [B, T, H, K]; do, dv [B, T, H, V]; A fp32; dstates [B*H, NT, K, V]
        T, H,
        K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
        DT: tl.constexpr, PREC: tl.constexpr,
    ):
        """dv = (k exp(b_last - b)) @ dh_end + A^T @ do, one [BT, BV] block."""
        n, bh, iv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        NT = tl.cdiv(T, BT)
        t0 = n * BT
        rows = tl.arange(0, BT)
        kk = tl.arange(0, K)
        cv = iv * BV + tl.arange(0, BV)
        offk = (bh // H) * T * H * K + (bh % H) * K
        offv = (bh // H) * T * H * V + (bh % H) * V
        gc = _load_chunk(g + offk, t0, T, H * K, rows, K)
        b = tl.cumsum(gc, 0)
        ke = -_expm1(gc) * tl.exp(_row(b, rows, BT - 1)[None, :] - b)
        Ac = tl.load(A + ((bh * NT + n) * BT + rows[:, None]) * BT + rows[None, :])
        doc = _load_chunk(do + offv + iv * BV, t0, T, H * V, rows, BV)
        dh_end = tl.load(dstates + (bh * NT + n) * K * V + kk[:, None] * V + cv[None, :])
        dvc = tl.dot(ke.to(DT), dh_end.to(DT), input_precision=PREC)
        dvc += tl.dot(tl.trans(Ac.to(DT)), doc.to(DT), input_precision=PREC)
        m = (t0 + rows)[:, None] < T
        tl.store(dv + offv + (t0 + rows)[:, None] * (H * V) + cv[None, :], dvc.to(dv.dtype.element_ty), mask=m)

    @triton.jit
    def _dqg_kernel(
        q, g, v, do,  # [B, T, H, K] / [B, T, H, V]
        states, dstates,  # [B*H, NT, K, V]: chunk-start states; gradients of chunk-end states
        dq, dg,  # out: [B, T, H, K] (q's dtype), [B, T, H, K] fp32
        T, H, scale,
        K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
        BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, FAST_RANGE: tl.constexpr,
    ):
        """dq and dg for one [BT, BK] block: every term is separable over the key channels."""
        n, bh, ik = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        NT = tl.cdiv(T, BT)
        t0 = n * BT
        rows = tl.arange(0, BT)
        kk = ik * BK + tl.arange(0, BK)
        offk = (bh // H) * T * H * K + (bh % H) * K + ik * BK
        offv = (bh // H) * T * H * V + (bh % H) * V
        qc = _load_chunk(q + offk, t0, T, H * K, rows, BK).to(tl.float32)
        gc = _load_chunk(g + offk, t0, T, H * K, rows, BK)
        b = tl.cumsum(gc, 0)
        k = -_expm1(gc)

        dA = tl.zeros([BT, BT], dtype=tl.float32)
        dq_h = tl.zeros([BT, BK], dtype=tl.float32)  # do @ h_start^T
        dk_h = tl.zeros([BT, BK], dtype=tl.float32)  # v @ dh_end^T
        outside = tl.zeros([BK], dtype=tl.float32)  # rowsum(dh_end * h_start)
        st = states + (bh * NT + n) * K * V
        dst = dstates + (bh * NT + n) * K * V
        for iv in range(0, V // BV):
            cv = iv * BV + tl.arange(0, BV)
            sv = kk[:, None] * V + cv[None, :]
            vc = _load_chunk(v + offv + iv * BV, t0, T, H * V, rows, BV).to(DT)
            doc = _load_chunk(do + offv + iv * BV, t0, T, H * V, rows, BV).to(DT)
            h_start = tl.load(st + sv)
            dh_end = tl.load(dst + sv)
            dA += tl.dot(doc, tl.trans(vc), input_precision=PREC)
            dq_h += tl.dot(doc, tl.trans(h_start.to(DT)), input_precision=PREC)
            dk_h += tl.dot(vc, tl.trans(dh_end.to(DT)), input_precision=PREC)
            outside += tl.sum(dh_end.to(tl.float32) * h_start.to(tl.float32), 1)

        # Pairs j < i through _intra; the diagonal pairs (decay exp(0) = 1) on their own, so that
        # dg below never cancels them (see chunk_hgrn2_bwd_ref).
        diag = tl.sum(tl.where(rows[:, None] == rows[None, :], dA, 0.0), 1)
        dA = tl.where(rows[:, None] > rows[None, :], dA, 0.0)
        slow = _is_slow(b, rows, BT, BC, FAST_RANGE)
        qs = qc * scale
        _, dq_in, dk_in = _intra(qs, k, b, dA, rows, slow, DT, PREC, BT, BC, False, True)
        b_last = _row(b, rows, BT - 1)
        dq_h = scale * tl.exp(b) * dq_h
        dk_h = tl.exp(b_last[None, :] - b) * dk_h
        dqc = dq_h + scale * (dq_in + diag[:, None] * k)
        dkc = dk_h + dk_in + diag[:, None] * qs
        # sum over j < t of k_j dk_h_j: a strictly lower-triangular matmul, exact in fp32, instead of
        # an inclusive cumsum minus the row (which would cancel).
        before = (rows[:, None] > rows[None, :]).to(tl.float32)
        keys_before = tl.dot(before, k * dk_h, input_precision="ieee")
        later = tl.cumsum(qc * (dq_h + scale * dq_in) - k * dk_in, 0, reverse=True)
        dgc = tl.exp(b_last)[None, :] * outside[None, :] + keys_before + later - tl.exp(gc) * dkc
        m = (t0 + rows)[:, None] < T
        ptr = offk + (t0 + rows)[:, None] * (H * K) + tl.arange(0, BK)[None, :]
        tl.store(dq + ptr, dqc.to(dq.dtype.element_ty), mask=m)
        tl.store(dg + ptr, dgc, mask=m)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch(kernel):
    # wrap_triton lets Inductor see the kernel inside the triton_op; the interpreter (CPU tests)
    # runs the raw kernel.
    return kernel if _interpreting() else wrap_triton(kernel)


def _dot_config(dtype: torch.dtype):
    """Matmul operand dtype and precision: bf16 operands for bf16 inputs; fp32 FMA matmuls for fp32
    inputs, the accuracy path (3xTF32 gave wrong results at K = 128, V = 16 on the H100 with
    Triton 3.6)."""
    if dtype == torch.bfloat16:
        return tl.bfloat16, "tf32"
    return tl.float32, "ieee"


# Launch configuration, fixed rather than autotuned (autotune inside a triton_op fights compile).
CONFIG = {
    "state_bv": 64, "state_warps": 8, "intra_warps": 4,
    "dv_bv": 64, "dv_warps": 4,
    "dqg_bk": 64, "dqg_bv": 64, "dqg_warps": 8, "dqg_stages": 1,
}


def _bv(V: int, key: str = "state_bv") -> int:
    return min(V, CONFIG[key])


def _intra_A(q, g, scale, DT, PREC):
    B, T, H, K = q.shape
    NT = triton.cdiv(T, _BT)
    A = torch.empty(B * H, NT, _BT, _BT, device=q.device, dtype=torch.float32)
    _launch(_intra_kernel)[(NT, B * H)](
        q, g, A, T, H, scale, K=K, BT=_BT, BC=_BC, DT=DT, PREC=PREC, FAST_RANGE=_FAST_RANGE,
        num_warps=CONFIG["intra_warps"], num_stages=1,
    )
    return A


def _state_stages(q) -> int:
    # Each pipeline stage buffers q and g chunks ([64, K], g in fp32): three stages overflow the
    # 227 KB of shared memory for fp32 inputs with K >= 128 and for K = 256.
    return 3 if q.shape[-1] * q.element_size() <= 256 else 1


def chunk_hgrn2_fwd(q, g, v, initial_state, scale):
    """Triton forward. q, g [B, T, H, K] (g fp32), v [B, T, H, V]; returns o, final state fp32."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, g, v = q.contiguous(), g.contiguous(), v.contiguous()
    DT, PREC = _dot_config(q.dtype)
    A = _intra_A(q, g, scale, DT, PREC)
    o = torch.empty_like(v)
    hT = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
    h0 = initial_state.contiguous() if initial_state is not None else hT
    BV = _bv(V)
    _launch(_state_kernel)[(V // BV, B * H)](
        q, g, v, A, o, h0, hT, hT, T, H, scale,
        K=K, V=V, BT=_BT, BV=BV, DT=DT, PREC=PREC,
        REVERSE=False, HAS_H0=initial_state is not None, STORE_O=True, STORE_STATES=False,
        num_warps=CONFIG["state_warps"], num_stages=_state_stages(q),
    )
    return o, hT


def chunk_hgrn2_bwd(q, g, v, initial_state, do, dht, scale):
    """Triton backward: (dq, dg fp32, dv, d initial state fp32)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    # Gradients can arrive with stride 0 (the gradient of `.sum()`); the kernels index densely.
    q, g, v, do = q.contiguous(), g.contiguous(), v.contiguous(), do.contiguous()
    NT = triton.cdiv(T, _BT)
    DT, PREC = _dot_config(q.dtype)
    BV = _bv(V)
    states = torch.empty(B * H, NT, K, V, device=q.device, dtype=q.dtype)
    dstates = torch.empty_like(states)
    hT = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
    dh0 = torch.empty_like(hT)
    common = dict(
        K=K, V=V, BT=_BT, BV=BV, DT=DT, PREC=PREC, STORE_O=False, STORE_STATES=True,
        num_warps=CONFIG["state_warps"], num_stages=_state_stages(q),
    )
    h0 = initial_state.contiguous() if initial_state is not None else hT
    _launch(_state_kernel)[(V // BV, B * H)](
        q, g, v, hT, v, h0, states, hT, T, H, scale,
        REVERSE=False, HAS_H0=initial_state is not None, **common,
    )
    dht_ = dht.contiguous() if dht is not None else dh0
    _launch(_state_kernel)[(V // BV, B * H)](
        q, g, do, hT, do, dht_, dstates, dh0, T, H, scale,
        REVERSE=True, HAS_H0=dht is not None, **common,
    )
    A = _intra_A(q, g, scale, DT, PREC)
    dv = torch.empty_like(v)
    BVd = _bv(V, "dv_bv")
    _launch(_dv_kernel)[(NT, B * H, V // BVd)](
        g, do, A, dstates, dv, T, H, K=K, V=V, BT=_BT, BV=BVd, DT=DT, PREC=PREC, num_warps=CONFIG["dv_warps"]
    )
    dq = torch.empty_like(q)
    dg = torch.empty_like(g)
    # State tiles [BK, BV] with BK < BV faulted (illegal address) or gave wrong bf16 results on the
    # H100 with Triton 3.6, so BV <= BK; K is split only from 128 up (K = 128 in halves is checked).
    BK = K if K <= 64 else CONFIG["dqg_bk"]
    _launch(_dqg_kernel)[(NT, B * H, K // BK)](
        q, g, v, do, states, dstates, dq, dg, T, H, scale,
        K=K, V=V, BT=_BT, BC=_BC, BK=BK, BV=min(_bv(V, "dqg_bv"), BK), DT=DT, PREC=PREC, FAST_RANGE=_FAST_RANGE,
        num_warps=CONFIG["dqg_warps"], num_stages=CONFIG["dqg_stages"],
    )
    return dq, dg, dv, dh0

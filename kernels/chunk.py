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

import torch
import torch.nn.functional as F
from hgrn2mini.kernels.gates import _INTERPRETING  # the interpreter or not: one value for both files
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
# Design (per head; BT = 64 steps a chunk, K and V up to 256). What each kernel reads and writes:
#
#   _state_kernel   grid (K/BS, V/2BS or V/BS, B*H), the only pass that walks the sequence.
#                   forward:  reads g, v        writes the chunk-start states (q's dtype), final state
#                   reverse:  reads q, g, do    writes the chunk-end state gradients, d initial state
#                   Two [BS, BS] fp32 state tiles in registers, value channels side by side,
#                   two matmuls a chunk sharing one key operand (CONFIG state_pair; else one).
#   _out_kernel     grid (V/BVO, chunks, B*H): reads q, g, v, states; writes o.
#                   o = (scale q exp(b)) @ h_start + A @ v, A the in-chunk pair matrix, built in
#                   registers over key blocks of BK channels and never stored. With DV it reads
#                   do and the state gradients instead and writes dv = (k exp(b_last - b)) @ dh_end
#                   + A^T @ do: the same work, transposed; and b = cumsum(g) in each chunk (gcum,
#                   fp32, g's size; STORE_GCUM) for the dq/dg kernel.
#   _dqg_kernel     grid (K/BK, chunks, B*H): reads q, g, gcum, v, do, states, state gradients;
#                   writes dq, dg (fp32). Every term is separable over key channels; dA = do v^T is
#                   recomputed by each key block's program (K/BK times). GATES (the gated op):
#                   also reads the gates' logits and writes their gradients instead (bf16), and
#                   the lower bound's per-chunk sums: the gates' derivative (kernels/gates.py).
#   _segment_kernel, _fixup_kernel: where B*H leaves SMs idle, the walk is cut into segments
#                   walked in parallel; the decay is diagonal, so joining them is elementwise
#                   (fixup reads and rewrites the states once).
#   _walk_out_kernel grid (V/BV, B*H*segments): state walk and out (or DV) in one pass, the
#                   [K, BV] state in registers: reads q, g, v; writes the states and o. Where
#                   CONFIG says walk_out (off by default), in place of state + out.
#   forward  = state (forward) + out;
#   backward = state (reverse) + out (DV) + dqg, with the forward's states kept by the op
#              (CONFIG keep_states; else the backward walks the sequence forward again first).
#
# The key k = -expm1(g) and b = cumsum(g) inside the chunk (fp32) are derived from g wherever
# they are needed, except that the dq/dg kernel loads b from the dv kernel (gcum, freed with the
# backward): there the scan came after the value loop with nothing to overlap it (dq/dg 0.372 ->
# 0.328 ms, the dv kernel's store +0.022; fwd+bwd 1.03-1.06x, H100 2026-11-25). The walks storing
# b for every later kernel cost them more than the scans it saved (walks 0.160 -> 0.261 ms; the out
# kernel, loading b and b_last rather than scanning, 0.282 -> 0.307; twelfth session). States are
# stored in the input dtype (they only feed matmuls whose operands are rounded to it anyway); the
# final state and d initial state are fp32.
#
# In-chunk pairs, exp(b_i - b_j) for j < i, are matmuls of factors with one reference per key
# channel: (q_i exp(b_i - m)) . (k_j exp(m - b_j)). With m = b_last / 2 every exponent lies in
# [b_last / 2, -b_last / 2], so while a chunk decays by at most 2 * _FAST_RANGE in every channel
# the factors are finite normal numbers and the product is exact to rounding: one matmul. Chunks
# that decay more take the sub-block path (`_path`, `_block`): a reference per 16-row sub-block,
# and if a sub-block itself decays by more than _FAST_RANGE, its pairs are evaluated one by one in
# log space. The diagonal pairs (exp(0) = 1) are always summed in fp32, never rounded to bf16.
#
# The out and dq/dg kernels compile the whole-chunk path alone for their first launch (most
# chunks; fewer registers, fewer spills) and redo the programs it flags (chunks decaying past
# e^120) in a second launch that takes every path, each of its programs covering several chunks
# (`_launch_chunks`, `_redo_chunks`).
#
# Measured (H100, Triton 3.6, 2026-11-25, benchmarks/RESULTS.md, twelfth session), GPU time: bf16
# B=8 T=2048 H=8 K=V=128, 0.229 ms forward and 0.784 ms forward+backward (fla's chunk_gla 0.434 /
# 1.725 in the same run; 2.20x to 3.23x over the benchmark shapes in the fifteenth session); per
# kernel, dq/dg 0.30, out + dv 0.30, both state walks 0.16 (paired tiles) and their segment walks
# 0.011. Every kernel uses 222-255 registers per thread: one 8-warp or two 4-warp programs per SM
# (12% occupancy), each loading and then computing, with no other program's math to hide its loads
# behind (Nsight Compute: the out kernel waits on loads for 46% of its stall samples, dq/dg for
# 23%; ~1.2 instructions per cycle, FMUL/FADD/FFMA the largest share). By bytes moved (g fp32
# and the states dominate; ~1.3 GB at 8 x 2048 x 8) this design needs ~0.44 ms forward+backward
# even at full copy bandwidth. Trading either way was slower on the H100 (2026-11-24,
# benchmarks/RESULTS.md, ninth session): a register cap for two programs per SM spills (dq/dg 0.49
# ms at 128 registers), and one backward kernel a chunk (dq/dg and dv, ~200 MB less traffic, half
# the programs) took 1.10 ms against 0.39 + 0.15. Scanning in registers, the tiles' rows
# reordered so that a thread holds consecutive steps, made every kernel slower (eleventh session:
# dq/dg 0.39 -> 0.61 ms, the walks 0.16 -> 0.29). Where the rest is (ablations, thirteenth session,
# 8 x 2048 x 8): the out and dv kernels with no in-chunk math at all take 0.263 ms against 0.306,
# so they are near their loads; no scans at all would save 0.075 ms over every kernel (0.044 of it
# dq/dg's reverse scan); the dq/dg kernel is the one far from its loads (0.295 ms against 0.151
# for its loads, stores and value-loop matmuls). Scans as tensor-core matmuls with a 0/1 triangle
# were slower in every kernel, twice (ninth and thirteenth sessions). The loads cost latency, not
# bandwidth: with the DRAM traffic of every tensor halved (the same instructions, odd chunks
# reading the even chunks' lines from L2) fwd+bwd went 0.774 -> 0.702 ms, and with the states'
# traffic halved 0.719 (fourteenth session): fewer bytes cannot reach 3x fla (0.575 ms), only
# programs that overlap their own loads with their math.
# ---------------------------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency; keep the CPU path importable
    triton = None
else:
    from hgrn2mini.kernels.gates import _INTERPRET, _log1p, _sigmoid_terms

_FAST_RANGE = 60.0  # exp(60) = 1.1e26 and exp(-60) = 8.8e-27: finite and normal in fp32 and bf16
_BT, _BC = 64, 16
_DIMS = (16, 32, 64, 128, 256)


def triton_supported(q: torch.Tensor, v: torch.Tensor) -> bool:
    """The Triton path: CUDA bf16 (fp32 up to K = 128) tensors, T > 0, K and V in {16, ..., 256}."""
    # fp16 takes the PyTorch path: fp16 has too little range for the in-chunk factors, and with
    # fp32 operands K = 128, V = 16 gave wrong outputs on the H100 with Triton 3.6 (3xTF32). fp32
    # with K = 256 overflowed shared memory.
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
        are scanned only in chunks that need it, behind a branch (branch-free, every key block
        scanning, was 6% slower fwd+bwd on the H100, 2026-11-24).
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
        SEGMENTED: tl.constexpr, STORE_STATES: tl.constexpr, PAIR: tl.constexpr,
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
        Not STORE_STATES (SEGMENTED only): neither states nor decay are written, only each
        segment's end and decay: the walk before `_walk_out_kernel`, which needs only those.
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
            if STORE_STATES:
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
                if STORE_STATES:
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
        the first is used (one at a time, each step waited on its own loads)."""
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

    @triton.jit
    def _redone(flags, first, stride, n0, NT, REDO: tl.constexpr):
        """The flags of chunks n0 .. n0 + REDO - 1 (0 past NT) of one program column of a first
        launch's grid, as int32: which of them a FLAGGED launch's program redoes."""
        ns = n0 + tl.arange(0, REDO)
        return (tl.load(flags + first + tl.arange(0, REDO) * stride, mask=ns < NT, other=0) != 0).to(tl.int32)

    @triton.jit
    def _redone_at(fl, r, REDO: tl.constexpr):
        """Whether the r-th of `_redone`'s flags is set (one term survives the sum)."""
        return tl.sum(tl.where(tl.arange(0, REDO) == r, fl, 0), 0) != 0

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

    @triton.jit
    def _walk_out_half(q, g, states, h, vc, A, oc, bad, offk, t0, T, H, scale, rows, ck, state_off,
                       K: tl.constexpr, BT: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                       FAST_RANGE: tl.constexpr, REVERSE: tl.constexpr):
        """One chunk of `_walk_out_kernel` for the key channels ck (half of them): stores the state
        tile h, adds this half's terms to A and to the output, returns the state tile walked past the
        chunk. The whole-chunk factors (`_whole`) are kept in fp32, qe = qs exp(b - m) and
        ke = k exp(m - b); times exp(m) they are the decays from the chunk start and to its end.
        This is `_pairs_A`'s whole-chunk path written out: calling it (which keeps start = eq * half
        and end = ek * half as tiles) was 2-3% slower fwd+bwd at K = V = 64 (H100, 2026-11-24,
        benchmarks/data/2026-11-24i_ab_walk_out_pairs_A.txt)."""
        tl.store(states + state_off, h.to(states.dtype.element_ty))
        qs = _load_tile(q + offk, t0, T, H * K, rows, ck).to(tl.float32) * scale
        gc = _load_tile(g + offk, t0, T, H * K, rows, ck)  # rows past T: g = 0 (decay 1, key 0)
        b_last = tl.sum(gc, 0)
        k = -_expm1(gc)
        A += tl.where(rows[:, None] == rows[None, :], tl.sum(qs * k, 1)[:, None], 0.0)
        ref = 0.5 * b_last[None, :]
        b = tl.cumsum(gc, 0)
        qe = qs * _exp(b - ref)
        ke = k * _exp(ref - b)
        half = _exp(ref)
        A += tl.where(rows[:, None] > rows[None, :], tl.dot(qe.to(DT), tl.trans(ke.to(DT)), input_precision=PREC), 0.0)
        bad_here = _bad(b_last, FAST_RANGE)
        if bad_here != 0:  # the factors left their range: the decays directly, every exponent <= 0 (o is redone)
            qe = qs * _exp(b)
            ke = k * _exp(b_last[None, :] - b)
            half = tl.full([1, ck.shape[0]], 1.0, dtype=tl.float32)
        if REVERSE:
            oc += tl.dot((ke * half).to(DT), h.to(DT), input_precision=PREC)
            x = qe * half
        else:
            oc += tl.dot((qe * half).to(DT), h.to(DT), input_precision=PREC)
            x = ke * half
        h = _exp(b_last)[:, None] * h + tl.dot(tl.trans(x.to(DT)), vc, input_precision=PREC)
        return h, A, oc, tl.maximum(bad, bad_here)

    @triton.jit
    def _walk_out_kernel(
        q, g, v, h0, h_in, states, o, hT, flags,  # q, g [B, T, H, K]; v, o [B, T, H, V]; h0 [B*H, K, V] fp32
        T, H, scale, NSEG,  # h_in [B*H, NSEG, K, V] fp32; states [B*H, NT, K, V] (out); flags as _out_kernel's
        K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
        DT: tl.constexpr, PREC: tl.constexpr, FAST_RANGE: tl.constexpr, REVERSE: tl.constexpr,
        HAS_H0: tl.constexpr, SEGMENTED: tl.constexpr,
    ):
        """The state walk and the out kernel in one pass: one program per head, BV value channels
        (and segment), holding the [K, BV] fp32 state in registers across the chunks, as two tiles
        of K / 2 rows (`_walk_out_half`; whole [BT, K] tiles spilled).

        forward:  o  = (scale q exp(b)) @ h_start + A @ v;    h <- exp(b_last) h + (k exp(b_last - b))^T v
        REVERSE:  dv = (k exp(b_last - b)) @ dh_end + A^T @ do; dh <- exp(b_last) dh + (scale q exp(b))^T do
        (v is do, o is dv), walking from the last chunk. Each chunk's state (start state, or end
        gradient) is stored for the kernels after it, the final one to hT.

        What it reads and writes: q, g and v once per value block, o once, the states once; against
        `_state_kernel` + `_out_kernel` the states are not read back and q, g not read a second
        time. Whole-chunk in-chunk path only: a chunk decaying by more than e^120 in some channel
        gets a flag and its output is redone by `_out_kernel` (GENERAL, FLAGGED), which reads the
        states stored here. The state update itself stays exact there: its decays are evaluated
        directly (every exponent <= 0).

        SEGMENTED: the segments are walked in parallel, each from the state entering it (h_in,
        from `_state_kernel` (not STORE_STATES) and `_segment_kernel`; h0 added for the segment
        walked first), so every state stored is global; hT comes from `_segment_kernel`.
        """
        iv, pid = tl.program_id(0), tl.program_id(1)
        NT = tl.cdiv(T, BT)
        bh, seg, c0, c1 = _segment(pid, NT, NSEG)
        # Inductor passes Python floats as fp64 scalars (or constexprs): keep every tile fp32.
        scale = tl.cast(scale, tl.float32)
        rows = tl.arange(0, BT)
        ck_lo = tl.arange(0, K // 2)
        ck_hi = K // 2 + tl.arange(0, K // 2)
        cv = iv * BV + tl.arange(0, BV)
        offk, offv = _head(bh, T, H, K, V)
        off_lo = ck_lo[:, None] * V + cv[None, :]
        off_hi = ck_hi[:, None] * V + cv[None, :]
        if SEGMENTED:
            h_lo = tl.load(h_in + (bh * NSEG + seg) * K * V + off_lo)
            h_hi = tl.load(h_in + (bh * NSEG + seg) * K * V + off_hi)
        else:
            h_lo = tl.zeros([K // 2, BV], dtype=tl.float32)
            h_hi = tl.zeros([K // 2, BV], dtype=tl.float32)
        if HAS_H0:  # the segment walked first starts from h0 as well
            first = _walk_order(0, 0, NSEG, REVERSE)
            h_lo += tl.where(seg == first, tl.load(h0 + bh * K * V + off_lo), 0.0)
            h_hi += tl.where(seg == first, tl.load(h0 + bh * K * V + off_hi), 0.0)
        for it in range(0, c1 - c0):
            n = _walk_order(it, c0, c1, REVERSE)
            t0 = n * BT
            st = states + (bh * NT + n) * K * V
            vc = _load_tile(v + offv, t0, T, H * V, rows, cv).to(DT)
            A = tl.zeros([BT, BT], dtype=tl.float32)
            oc = tl.zeros([BT, BV], dtype=tl.float32)
            bad = tl.zeros([], dtype=tl.int8)
            h_lo, A, oc, bad = _walk_out_half(q, g, st, h_lo, vc, A, oc, bad, offk, t0, T, H, scale, rows, ck_lo,
                                              off_lo, K, BT, DT, PREC, FAST_RANGE, REVERSE)
            h_hi, A, oc, bad = _walk_out_half(q, g, st, h_hi, vc, A, oc, bad, offk, t0, T, H, scale, rows, ck_hi,
                                              off_hi, K, BT, DT, PREC, FAST_RANGE, REVERSE)
            if REVERSE:
                oc += tl.dot(tl.trans(A.to(DT)), vc, input_precision=PREC)
            else:
                oc += tl.dot(A.to(DT), vc, input_precision=PREC)
            _store_tile(o + offv, oc, t0, T, H * V, rows, cv)
            tl.store(flags + (bh * NT + n) * (V // BV) + iv, bad)
        if not SEGMENTED:
            tl.store(hT + bh * K * V + off_lo, h_lo)
            tl.store(hT + bh * K * V + off_hi, h_hi)

    @triton.jit
    def _dqg_chunk(q, g, gcum, v, do, states, dstates, dq, dg, T, H, scale, flags, q_logits, f_logits, lb,
                   dlb_part, ik, n, bh, NT,
                   K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, PREC32: tl.constexpr,
                   FAST_RANGE: tl.constexpr, GENERAL: tl.constexpr, GATES: tl.constexpr, HAS_LB: tl.constexpr,
                   LOAD_GCUM: tl.constexpr):
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
        # The loads issued before any is used (q and g: 1.5% faster fwd+bwd than converting q between
        # them; issuing them before the value loop instead was 2% slower: H100, 2026-11-24).
        q_tile = _load_tile(q + offk, t0, T, H * K, rows, ck)
        gc = _load_tile(g + offk, t0, T, H * K, rows, ck)
        if LOAD_GCUM:
            b, b_last = _load_gcum(gcum + offk, t0, T, H * K, rows, ck, BT)
        qs = q_tile.to(tl.float32) * scale
        if not LOAD_GCUM:
            b = tl.cumsum(gc, 0)
            b_last = tl.sum(gc, 0)
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
        _store_tile(dq + offk, dqc, t0, T, H * K, rows, ck)
        _store_tile(dg + offk, dgc, t0, T, H * K, rows, ck)
        if not GENERAL:
            tl.store(flags + pid, _bad(b_last, FAST_RANGE))

    @triton.jit
    def _dqg_kernel(
        q, g, gcum, v, do,  # [B, T, H, K] / [B, T, H, V]; LOAD_GCUM: gcum [B, T, H, K] (`_load_gcum`)
        states, dstates,  # [B*H, NT, K, V]: chunk-start states; gradients of chunk-end states
        dq, dg,  # out: [B, T, H, K] (q's dtype), [B, T, H, K] fp32; GATES: d q_logits, d f_logits (q's dtype)
        T, H, scale, flags,  # flags as in _out_kernel
        q_logits, f_logits,  # GATES: the gates' logits [B, T, H, K] (q = silu(q_logits), g = log f)
        lb, dlb_part,  # GATES and HAS_LB: the lower bound [H*K] and (out) [B*NT, H*K] fp32 sums per chunk
        K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
        BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, PREC32: tl.constexpr,
        FAST_RANGE: tl.constexpr, GENERAL: tl.constexpr, FLAGGED: tl.constexpr,
        GATES: tl.constexpr, HAS_LB: tl.constexpr, LOAD_GCUM: tl.constexpr, REDO: tl.constexpr,
    ):
        """dq and dg of one chunk and BK key channels (formulas in chunk_hgrn2_bwd_ref): every
        term is separable over the key channels. Two variants as in `_out_kernel`. The key
        blocks of a chunk are neighbours in the grid, so v and do, which each reads whole, come
        from L2 after the first. LOAD_GCUM: b from gcum (the dv kernel's, STORE_GCUM), not scanned:
        here the scan comes after the value loop, with nothing left to overlap it."""
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
                                   K, V, BT, BC, BK, BV, DT, PREC, PREC32, FAST_RANGE, GENERAL, GATES, HAS_LB,
                                   LOAD_GCUM)
        else:
            _dqg_chunk(q, g, gcum, v, do, states, dstates, dq, dg, T, H, scale, flags, q_logits, f_logits, lb,
                       dlb_part, tl.program_id(0), tl.program_id(1), tl.program_id(2), NT,
                       K, V, BT, BC, BK, BV, DT, PREC, PREC32, FAST_RANGE, GENERAL, GATES, HAS_LB, LOAD_GCUM)


def _launch(kernel):
    # wrap_triton lets Inductor see the kernel inside the triton_op; the interpreter (CPU tests)
    # runs the raw kernel.
    return kernel if _INTERPRETING else wrap_triton(kernel)


def _redo_chunks(grid, device: torch.device) -> int:
    """Chunks each program of a FLAGGED launch covers: the first launch's programs over at least
    two per SM, a power of two up to 16. Most chunks are never flagged, and the FLAGGED launch's
    programs, compiled for every path, fit one or two to an SM: one per chunk, they only load a
    flag and return, but the GPU still starts them wave after wave (dq/dg 15.5 us and the out
    kernel 6 us a launch at 8 x 2048 x 8, H100, 2026-11-24). Where every chunk is flagged, a
    program walks its REDO chunks in about the waves the one-per-chunk launch took."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    redo = 1
    while redo < 16 and grid[0] * grid[1] * grid[2] >= 2 * redo * 2 * sms:
        redo *= 2
    return redo


def _launch_chunks(kernel, grid, *args, JOIN=None, STORE_GCUM=None, flags=None, **meta):
    """Launches the out or dq/dg kernel over its grid (chunks along its second axis): where K and V
    are at least CONFIG["two_pass_min_dim"], as its whole-chunk variant and then its GENERAL,
    FLAGGED variant, which redoes the programs the first flagged (chunks decaying by more than
    e^120), REDO chunks a program (`_redo_chunks`); else once, GENERAL for every program. JOIN and
    STORE_GCUM (the out kernel's; None for dq/dg) go to the first launch only: the states it joins
    are global for the second, and it stores every chunk's b. flags given: another kernel did the
    first variant's work and flagged (`_walk_out_kernel`); only the second launch runs."""
    first_only = {} if JOIN is None else {"JOIN": JOIN, "STORE_GCUM": STORE_GCUM}
    flagged = flags is not None
    two_pass = flagged or min(meta["K"], meta["V"]) >= CONFIG["two_pass_min_dim"]
    if not flagged:
        flags = torch.empty(grid[0] * grid[1] * grid[2], device=args[0].device, dtype=torch.int8)
        _launch(kernel)[grid](*args, flags=flags, GENERAL=not two_pass, FLAGGED=False, REDO=1, **first_only, **meta)
    if two_pass:
        redo = _redo_chunks(grid, args[0].device)
        _launch(kernel)[(grid[0], triton.cdiv(grid[1], redo), grid[2])](
            *args, flags=flags, GENERAL=True, FLAGGED=True, REDO=redo, **{k: False for k in first_only}, **meta)


def _dot_config(dtype: torch.dtype):
    """Matmul operand dtype and precision, and the precision of fp32-operand matmuls: bf16
    operands (tf32 for fp32 ones) for bf16 inputs; fp32 FMA matmuls for fp32 inputs, the accuracy
    path (3xTF32 gave wrong results at K = 128, V = 16 on the H100 with Triton 3.6)."""
    if dtype == torch.bfloat16:
        return tl.bfloat16, "tf32", "tf32"
    return tl.float32, "ieee", "ieee"


# Launch configuration, fixed rather than autotuned (autotune inside a triton_op fights compile).
# Every shape runs the configuration checked over all K, V in the shape sweep
# (benchmarks/check_shapes.py); FAST overrides it for K = V = 128 in bf16, where it was checked too.
# Larger key blocks at V = 16 gave wrong bf16 outputs (K = 256, out_bk 128) and an illegal address
# (dqg_bk 64) on the H100 with Triton 3.6: keep overrides to the shapes they were checked at.
CONFIG = {
    # state_pair: each walking program holds two [BS, BS] state tiles side by side over the value
    # channels (`_state_kernel` PAIR), so g (and q, walking back) is read and scanned once for both.
    # Both walks 0.228 -> 0.159 ms, fwd+bwd 0.916 -> 0.851 at 8 x 2048 x 8 (1.08x; 2 x 8192 x 8 1.07x,
    # 8 x 2048 x 16 1.11x), outputs bit-identical (8 warps: 0.212 ms). H100, 2026-11-24,
    # benchmarks/RESULTS.md (tenth session). Compiled offline with its pointers aligned as a launch
    # has them, it does not spill (254 registers; Triton 3.6 and 3.9).
    # "auto": paired where the paired programs, segmented up to max_segments, still reach
    # min_programs (not at B*H = 8, T = 16384: there 128 programs against 256 unpaired, and
    # fwd+bwd 1.017 ms paired against 0.921 unpaired in one A/B run); True: wherever V >= 2 BS.
    "state_bs": 64, "state_pair": "auto", "state_warps": 4, "state_stages": 3, "min_programs": 256,
    # Segments of the state walk (see _state_kernel), up to max_segments where the state tiles
    # alone give fewer than min_programs programs (B*H small, T long). Measured 2026-11-24, fwd+bwd
    # B=1 T=16384 H=8 K=V=128: 1.36 ms with segments against 1.93 without; where B*H fills the
    # GPU they only add the join (benchmarks/RESULTS.md). 16, not 8: at B*H = 8, T = 16384 the paired
    # walk then reaches 256 programs (the state walks 0.241 -> 0.165 ms, their joins 0.022 -> 0.041;
    # fwd+bwd 0.945 -> 0.891 ms, 1.06x in one A/B run, H100 2026-11-24, eleventh session).
    "max_segments": 16, "min_segment_chunks": 4,
    "out_bk": 64, "out_bv": 128, "out_warps": 8, "out_stages": 1,
    "dqg_bk": 32, "dqg_warps": 4, "dqg_stages": 1,
    # Keep the forward's chunk-start states for the backward instead of walking the sequence again
    # (hgrn2mini/ops.py): one sequential pass less per backward (1.43 -> 1.26 ms fwd+bwd at B=8
    # T=2048 H=8 K=V=128, 2026-11-24), for saved memory of twice q's size per call (K = V).
    "keep_states": True,
    # The out and dq/dg kernels in two launches (`_launch_chunks`): the common whole-chunk path
    # alone first, with fewer registers (dq/dg at K = V = 128: 0.47 against 0.53 ms, fwd+bwd 1.20 ->
    # 1.08 ms, H100 2026-11-24), where K and V are both at least this. Below it one launch takes
    # every path: the two-launch kernels faulted (illegal address) at K = 32 and 64 with V = 16
    # on the H100 with Triton 3.6 (2026-11-24).
    "two_pass_min_dim": 64,
    # The state walk and the out / dv kernel as one pass (`_walk_out_kernel`, `_walk_out_supported`):
    # value blocks of walk_out_bv channels, segments (as above) up to walk_out_min_programs programs.
    # Off: one program walks every chunk of its head, so the chunk's in-chunk work is on its
    # sequential path, with B*H*V/BV programs (not B*H*chunks) to hide it. It was 1.21x faster
    # fwd+bwd at K = V = 64 against the split kernels as they were configured then (8 x 2048 x 16:
    # 0.827 against 1.001 ms) and 1.38x slower at K = V = 128 (8 x 2048 x 8: 1.231 against 0.893 ms;
    # the kernel spills there, and A is built once per value block), H100 2026-11-24; since
    # 2026-11-25 the split kernels at K = 64 (FAST) are 1.12x faster than it (benchmarks/RESULTS.md).
    # Segments up to 256 programs (two 4-warp programs per SM at K = 64): at 2 x 8192 x 16, K = 64,
    # 0.853 ms against 1.094 with 128; at 8 x 2048 x 16, 0.820 against 0.830 (512: 0.859).
    "walk_out": False, "walk_out_bv": 64, "walk_out_warps": 8, "walk_out_stages": 2, "walk_out_min_programs": 256,
}
# dq/dg at K = V = 128: 4 warps and 2 stages since it loads b (LOAD_GCUM; 231 registers at 8 warps,
# offline): dq/dg 0.327 -> 0.295 ms, fwd+bwd 1.03-1.04x at 8 x 2048 x 8, 2 x 8192 x 8, 8 x 2048 x 16,
# 16 x 2048 x 6, outputs bit-identical; 4 warps alone 1.03-1.04x; 128-key blocks 2.5x slower
# (H100 2026-11-25, benchmarks/data/2026-11-25g_ab_configs_dqg.txt).
FAST = {(128, 128, torch.bfloat16): {"out_bk": 128, "out_warps": 4, "dqg_bk": 64, "dqg_warps": 4, "dqg_stages": 2},
        # K = V = 64: the split kernels, the out kernel at 2 warps (4: 0.271 ms, 2: 0.245 at 8 x 2048
        # x 16); with dq/dg in one 64-key program a chunk scanning g itself, fwd+bwd 0.693 against
        # 0.781 ms through `_walk_out_kernel` (1.13x; 2 x 8192 x 16 1.12x). Two 32-key programs
        # loading the dv kernel's b are 1.014-1.017x faster again (dq/dg 0.297 against 0.331, the dv
        # kernel's store +0.025; 720 bytes of spills at 64 keys offline, 104 at 32); 64 keys loading
        # b 0.356, 32 keys scanning 0.349, 8 warps 0.455, 2 warps 5.0 (spills). H100 2026-11-25,
        # benchmarks/RESULTS.md. walk_out_warps: where CONFIG walk_out is turned on.
        (64, 64, torch.bfloat16): {"out_warps": 2, "dqg_bk": 32, "dqg_warps": 4, "walk_out_warps": 4}}


def _cfg(q: torch.Tensor, v: torch.Tensor, key: str):
    # Compared, not looked up: under dynamic shapes K and V are SymInts, which do not hash.
    for (K, V, dtype), override in FAST.items():
        if q.shape[-1] == K and v.shape[-1] == V and q.dtype == dtype:
            return override.get(key, CONFIG[key])
    return CONFIG[key]


def _segments(programs: int, NT: int, min_programs: int) -> int:
    """How many segments to cut each head's walk into: doubling, up to CONFIG max_segments, while
    the doubled programs still fit in one wave (min_programs, about the GPU's slots for them) and
    each segment keeps min_segment_chunks chunks. Not past one wave: at B*H = 96, K = V = 128 (192
    programs), two segments are two waves of 16 chunk steps, no faster than one of 32, and cost the
    join and the segment walks: fwd+bwd 1.203 ms with them, 1.118 without at 16 x 2048 x 6 (H100,
    2026-11-25, benchmarks/RESULTS.md)."""
    nseg = 1
    while (nseg * 2 <= CONFIG["max_segments"] and programs * nseg * 2 <= min_programs
           and NT >= 2 * nseg * CONFIG["min_segment_chunks"]):
        nseg *= 2
    return nseg


def _run_states(q, g, x, h0, reverse, scale, join_later=False, nseg=None):
    """Chunk-start states (or chunk-end state gradients), [B*H, NT, K, V] in q's dtype, the final
    state (or d initial state), fp32, and the join: where the walk was segmented and join_later,
    (decay, h_in, nseg) for the out kernel to make the states global as it reads them (JOIN),
    else False (the states are global already).

    nseg given (> 1): only each segment's end is walked, no state stored; returns (h_in, the final
    state), the state entering each segment [B*H, nseg, K, V] fp32 (zero for the segment walked
    first), for `_walk_out_kernel`."""
    B, T, H, K = q.shape
    V = x.shape[-1]
    NT = triton.cdiv(T, _BT)
    DT, PREC, _ = _dot_config(q.dtype)
    dev = q.device
    store = nseg is None
    states = torch.empty(B * H, NT, K, V, device=dev, dtype=q.dtype) if store else q
    hT = torch.empty(B, H, K, V, device=dev, dtype=torch.float32)
    # The walk is latency-bound per program: where B * H alone leaves SMs idle, cut the sequence
    # into segments walked in parallel (CONFIG max_segments) and then use smaller state tiles.
    # State tiles with BK < BV faulted on the H100 with Triton 3.6: square tiles only.
    BS = min(K, V, CONFIG["state_bs"])

    def programs(bs, paired):  # one per state tile (or pair of tiles) and head, before segments
        return (K // bs) * (V // (bs * (1 + paired))) * B * H

    # Pairs halve the programs: "auto" pairs only where segments can make up for it (CONFIG).
    pair = V >= 2 * BS and (CONFIG["state_pair"] is True or (  # stays so as BS halves
        CONFIG["state_pair"] == "auto" and programs(BS, True) * CONFIG["max_segments"] >= CONFIG["min_programs"]))
    if store:
        nseg = _segments(programs(BS, pair), NT, CONFIG["min_programs"])
    # Smaller tiles (four times the programs) only where the walk fills at most half a wave.
    while BS > 16 and programs(BS, pair) * nseg * 2 <= CONFIG["min_programs"]:
        BS //= 2
    grid = (K // BS, V // (BS * (1 + pair)), B * H * nseg)
    common = dict(K=K, V=V, BT=_BT, BS=BS, DT=DT, PREC=PREC, REVERSE=reverse, HAS_H0=h0 is not None,
                  STORE_STATES=store, PAIR=pair, num_warps=CONFIG["state_warps"], num_stages=CONFIG["state_stages"])
    h0_ = h0 if h0 is not None else hT
    if nseg == 1:
        _launch(_state_kernel)[grid](q, g, x, h0_, states, hT, hT, hT, T, H, scale, 1, SEGMENTED=False, **common)
        return states, hT, False
    seg_end = torch.empty(B * H, nseg, K, V, device=dev, dtype=torch.float32)
    h_in = torch.empty_like(seg_end)
    decay = torch.empty(B * H, NT, K, device=dev, dtype=torch.float32) if store else seg_end
    seg_decay = torch.empty(B * H, nseg, K, device=dev, dtype=torch.float32)
    _launch(_state_kernel)[grid](q, g, x, h0_, states, seg_end, decay, seg_decay, T, H, scale, nseg,
                                 SEGMENTED=True, **common)
    _launch(_segment_kernel)[(K // BS, V // BS, B * H)](seg_end, seg_decay, h_in, hT, nseg, K=K, V=V, BS=BS,
                                                        REVERSE=reverse)
    if not store:
        return h_in, hT
    if join_later:
        return states, hT, (decay, h_in, nseg)
    _launch(_fixup_kernel)[(NT, B * H, (K // BS) * (V // BS))](states, decay, h_in, T, nseg, K=K, V=V, BT=_BT, BS=BS)
    return states, hT, False


def _walk_out_supported(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the state walk and the out (or dv) kernel run as one pass (`_walk_out_kernel`):
    where CONFIG (or FAST, per shape) says walk_out, K up to 128 (its state as two [K / 2, BV]
    tiles; a matmul needs K / 2 >= 16 on the GPU), K and V at least CONFIG two_pass_min_dim (its
    chunks decaying past e^120 are redone by the two-launch out kernel)."""
    K, V = q.shape[-1], v.shape[-1]
    return (_cfg(q, v, "walk_out") and (K >= 32 or _INTERPRETING) and K <= 128
            and min(K, V) >= CONFIG["two_pass_min_dim"])


def _run_walk_out(q, g, x, h0, reverse, scale):
    """The states (or their gradients) and o (or dv, x being do) in one pass; returns (states,
    final state (or d initial state), o (or dv)) as `_run_states` and `_run_out` would."""
    B, T, H, K = q.shape
    V = x.shape[-1]
    NT = triton.cdiv(T, _BT)
    DT, PREC, _ = _dot_config(q.dtype)
    BV = min(V, _cfg(q, x, "walk_out_bv"))
    nseg = _segments((V // BV) * B * H, NT, CONFIG["walk_out_min_programs"])
    states = torch.empty(B * H, NT, K, V, device=q.device, dtype=q.dtype)
    out = torch.empty_like(x)
    flags = torch.empty((V // BV) * NT * B * H, device=q.device, dtype=torch.int8)
    if nseg > 1:
        h_in, hT = _run_states(q, g, x, h0, reverse, scale, nseg=nseg)
    else:
        hT = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
        h_in = hT  # not read
    _launch(_walk_out_kernel)[(V // BV, B * H * nseg)](
        q, g, x, h0 if h0 is not None else hT, h_in, states, out, hT, flags, T, H, scale, nseg,
        K=K, V=V, BT=_BT, BV=BV, DT=DT, PREC=PREC, FAST_RANGE=_FAST_RANGE, REVERSE=reverse,
        HAS_H0=h0 is not None, SEGMENTED=nseg > 1,
        num_warps=_cfg(q, x, "walk_out_warps"), num_stages=CONFIG["walk_out_stages"],
    )
    # The chunks flagged above again, every in-chunk path, from the states stored (global).
    _run_out(q, g, x, states, scale, reverse, False, redo=(out, flags, BV))
    return states, hT, out


def _run_out(q, g, v, states, scale, dv, join, redo=None, gcum=None):
    """o (or dv, from do and the state gradients) through _out_kernel; join as `_run_states`
    returns it (a segmented walk's states are made global here, in place). redo: (out, flags,
    value block) of `_walk_out_kernel`, whose flagged chunks are computed again into out. gcum:
    where to store b = cumsum(g) within each chunk (`_out_kernel` STORE_GCUM), or None."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    DT, PREC, _ = _dot_config(q.dtype)
    out, flags, BVO = redo if redo is not None else (torch.empty_like(v), None, min(V, CONFIG["out_bv"]))
    BK = min(K, _cfg(q, v, "out_bk"))
    decay, h_in, nseg = join if join else (q, q, 1)  # without a join never read: any input (not an output)
    _launch_chunks(
        _out_kernel, (V // BVO, triton.cdiv(T, _BT), B * H), q, g, gcum if gcum is not None else out, v, states, out,
        T, H, scale, STORE_GCUM=gcum is not None,
        # Slices of 32 rows: 16-row slices in a loop, not unrolled, made the out kernel ~0.05 ms
        # slower than the fixup kernel the join replaces (H100, 2026-11-24).
        decay=decay, h_in=h_in, NSEG=nseg, JOIN=bool(join), JR=min(32, K), flags=flags,
        K=K, V=V, BT=_BT, BC=_BC, BK=BK, BVO=BVO, DT=DT, PREC=PREC, FAST_RANGE=_FAST_RANGE, DV=dv,
        num_warps=_cfg(q, v, "out_warps"), num_stages=CONFIG["out_stages"],
    )
    return out


def chunk_hgrn2_fwd_with_states(q, g, v, initial_state, scale):
    """Triton forward. q, g [B, T, H, K] (g fp32), v [B, T, H, V]; returns o, the final state
    (fp32) and the chunk-start states [B*H, NT, K, V] (q's dtype), which the backward can take
    instead of walking the sequence again."""
    q, g, v = q.contiguous(), g.contiguous(), v.contiguous()
    h0 = initial_state.contiguous() if initial_state is not None else None
    if _walk_out_supported(q, v):
        states, hT, o = _run_walk_out(q, g, v, h0, False, scale)
        return o, hT, states
    states, hT, join = _run_states(q, g, v, h0, False, scale, join_later=True)
    return _run_out(q, g, v, states, scale, False, join), hT, states


def chunk_hgrn2_fwd(q, g, v, initial_state, scale):
    """Triton forward: o and the final state (fp32)."""
    o, hT, _ = chunk_hgrn2_fwd_with_states(q, g, v, initial_state, scale)
    return o, hT


def chunk_hgrn2_bwd(q, g, v, initial_state, do, dht, scale, states=None, logits=None):
    """Triton backward: (dq, dg fp32, dv, d initial state fp32). states: the forward's chunk-start
    states, or None to compute them again.

    logits: (q_logits, f_logits [B, T, H, K] in q's dtype, lower_bound [H*K] fp32 or None) where q
    and g are HGRN2's gates of these (`hgrn2mini.kernels.gates`): then the dq/dg kernel carries the
    gradients on through the gates (`gates_bwd`) and this returns (d q_logits, d f_logits, d
    lower_bound or None, dv, d initial state); dq and dg are never written to memory."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    # Gradients can arrive with stride 0 (the gradient of `.sum()`); the kernels index densely.
    q, g, v, do = q.contiguous(), g.contiguous(), v.contiguous(), do.contiguous()
    h0 = initial_state.contiguous() if initial_state is not None else None
    DT, PREC, PREC32 = _dot_config(q.dtype)
    if states is None:
        states, _, _ = _run_states(q, g, v, h0, False, scale)
    dht = dht.contiguous() if dht is not None else None
    if _walk_out_supported(q, v):
        dstates, dh0, dv = _run_walk_out(q, g, do, dht, True, scale)
        gcum = None  # the dq/dg kernel scans g itself
    else:
        dstates, dh0, join = _run_states(q, g, do, dht, True, scale, join_later=True)
        gcum = torch.empty_like(g)  # the dv kernel's scans of g, for the dq/dg kernel
        dv = _run_out(q, g, do, dstates, scale, True, join, gcum=gcum)
    # Without logits (or gcum) never read: any input stands in (never an output).
    q_logits, f_logits, lower_bound = logits if logits is not None else (q, q, None)
    q_logits, f_logits = q_logits.contiguous(), f_logits.contiguous()
    has_lb = lower_bound is not None
    lb = lower_bound.contiguous() if has_lb else q
    dlb_part = torch.empty(B * triton.cdiv(T, _BT) if has_lb else 0, H * K, device=q.device, dtype=torch.float32)
    dq, dg = torch.empty_like(q), torch.empty_like(f_logits if logits is not None else g)
    # State tiles [BK, BV] with BK < BV faulted (illegal address) or gave wrong bf16 results on the
    # H100 with Triton 3.6, so BV = BK.
    BK = min(K, _cfg(q, v, "dqg_bk"))
    BV = min(V, BK)
    _launch_chunks(
        _dqg_kernel, (K // BK, triton.cdiv(T, _BT), B * H), q, g, gcum if gcum is not None else g, v, do, states,
        dstates, dq, dg, T, H, scale, q_logits=q_logits, f_logits=f_logits, lb=lb, dlb_part=dlb_part,
        K=K, V=V, BT=_BT, BC=_BC, BK=BK, BV=BV, DT=DT, PREC=PREC, PREC32=PREC32, FAST_RANGE=_FAST_RANGE,
        num_warps=_cfg(q, v, "dqg_warps"), num_stages=_cfg(q, v, "dqg_stages"), GATES=logits is not None,
        HAS_LB=has_lb, LOAD_GCUM=gcum is not None,
    )
    if logits is not None:
        return dq, dg, (dlb_part.sum(0) if has_lb else None), dv, dh0
    return dq, dg, dv, dh0

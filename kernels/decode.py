"""The decode step of one HGRN2 block in five Triton kernels, each beside its PyTorch reference.

At one token a block is a chain of matrix-vector products with small elementwise work between
them; run as PyTorch ops it is 15-20 kernels a layer, each too short to fill the GPU. Here:

    1. norm_matvec       q, f, i logits = attn_norm(x) [W_q; W_f; W_i]^T   (three weights, one launch)
    2. recurrent_step    gates from the logits, the state updated in place, o = q^T h
    3. norm_matvec_add   x += g_norm(o) W_o^T
    4. norm_glu          h = silu(mlp_norm(x) W_gate^T) * (mlp_norm(x) W_up^T)
    5. matvec_add        x += h W_down^T

The norms are prologues: each program computes its rows' mean square itself (x is one row of D
elements per batch row, read from L2), so no normalized copy is written. Numerics follow the
PyTorch path: the norm in fp32 rounded to the activation dtype before the product, each
projection accumulated in fp32 and rounded to the activation dtype, the residual add of two
rounded values, the gates as `kernels.gates` (log f in fp32, k = 1 - f = -expm1(log f)).

Each weight is read in place (three pointers for q, f, i; gate and up side by side): no
concatenated copy. Small batches multiply and sum elementwise (a matvec is a bandwidth problem);
from DOT_MIN_BATCH rows on, tiles go through tl.dot. Launch settings come from LAUNCH
(`kernels.decode_launch`); with SPLIT_K > 1 a matvec's K slices are split over that many programs
a tile, which the last of them sums in a fixed order (`_split_sum`).

The kernels run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests); elsewhere
the wrappers compute the reference instead.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from hgrn2mini.kernels.decode_launch import (  # noqa: F401  (LAUNCH: kernels.decode.LAUNCH is the table)
    DOT_MIN_BATCH,
    LAUNCH,
    check_2d,
    check_norm_weight,
    check_x,
    launch_settings,
    split_scratch,
)
from hgrn2mini.kernels.gates import _INTERPRET, _INTERPRETING, MASKED_F_LOGIT, _log_gate, gates
from hgrn2mini.kernels.norm import rms_norm_ref
from hgrn2mini.kernels.settings import cdiv
from triton.language.extra import libdevice
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_MASKED = tl.constexpr(MASKED_F_LOGIT)


# ----------------------------------------------------------------------------------------------
# References: the model's numerics in PyTorch (float32 math, float64 for float64 inputs)
# ----------------------------------------------------------------------------------------------


def norm_matvec_ref(x, norm_weight, eps, weights) -> torch.Tensor:
    """[len(weights), B, N]: rmsnorm(x) @ W^T for each W [N, D]; x [B, D]."""
    y = rms_norm_ref(x, norm_weight, eps)
    return torch.stack([F.linear(y, w) for w in weights])


def norm_matvec_add_ref(x, norm_weight, eps, weight, residual) -> torch.Tensor:
    """residual + rmsnorm(x) @ W^T, the product rounded to the activation dtype before the add."""
    return residual + F.linear(rms_norm_ref(x, norm_weight, eps), weight)


def matvec_add_ref(x, weight, residual) -> torch.Tensor:
    return residual + F.linear(x, weight)


def norm_glu_ref(x, norm_weight, eps, gate, up) -> torch.Tensor:
    y = rms_norm_ref(x, norm_weight, eps)
    return F.silu(F.linear(y, gate)) * F.linear(y, up)


def recurrent_step_ref(qfi, lower_bound, live, state, scale):
    """(o [B, H*V], new state [B, H, K, V]) from qfi [3, B, D] = q, f, i logits, the step of
    `HGRN2Attention` at one token; a row not live gets the masked forget logit (f = 1, k = 0)."""
    q_logits, f_logits, v = qfi
    B, H, K, V = state.shape
    f_logits = f_logits.masked_fill(~live.bool()[:, None], MASKED_F_LOGIT)
    q, g = gates(q_logits, f_logits, lower_bound)
    q, g = q.view(B, H, K), g.to(state.dtype).view(B, H, K)
    k = -torch.expm1(g)  # 1 - f, accurate when f is close to 1
    new = g.exp()[..., None] * state + k[..., None] * v.view(B, H, V).to(state.dtype)[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", q.to(state.dtype) * scale, new)
    return o.reshape(B, H * V).to(v.dtype), new


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _expm1(x):
    """exp(x) - 1, exact to a few ulps for small x too: libdevice's on the GPU; under the
    interpreter Kahan's form, u - 1 rescaled by x / log u where u = exp(x) rounded."""
    if _INTERPRET:
        u = tl.exp(x)
        d = u - 1.0
        lg = tl.log(tl.where((u == 1.0) | (d == -1.0), 2.0, u))
        return tl.where(u == 1.0, x, tl.where(d == -1.0, -1.0, d * (x / lg)))
    else:
        return libdevice.expm1(x)


@triton.jit
def _rstd(x, rows, B, Kd, eps, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / rms of rows `rows` of x [B, Kd] in fp32 ([BLOCK_B]): the norm prologue's own pass."""
    ss = tl.zeros([BLOCK_B], dtype=tl.float32)
    for k0 in range(0, Kd, BLOCK_K):
        ck = k0 + tl.arange(0, BLOCK_K)
        m = (rows < B)[:, None] & (ck < Kd)[None, :]
        xt = tl.load(x + rows[:, None] * Kd + ck[None, :], mask=m, other=0.0).to(tl.float32)
        ss += tl.sum(xt * xt, 1)
    return 1.0 / tl.sqrt(ss / Kd + eps)


@triton.jit
def _w_tiles(w0, w1, cols, N, Kd, ck, TWO: tl.constexpr):
    """[BLOCK_N, BLOCK_K] tiles of W0 (and W1 where TWO) [N, Kd] at output columns cols, inputs ck."""
    wm = (cols < N)[:, None] & (ck < Kd)[None, :]
    wo = cols[:, None] * Kd + ck[None, :]
    wt0 = tl.load(w0 + wo, mask=wm, other=0.0)
    wt1 = wt0
    if TWO:
        wt1 = tl.load(w1 + wo, mask=wm, other=0.0)
    return wt0, wt1


@triton.jit
def _mv_slice(acc0, acc1, x, nw, r, wt0, wt1, rows, B, Kd, ck, NORM: tl.constexpr, TWO: tl.constexpr,
              DOT: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc += norm(x)[rows, ck] times the weight tiles (`_matvec`): NORM 0 none, 1 rmsnorm by r,
    2 by r and weight nw; the normalized x rounded to W's dtype, as the PyTorch norm returns x's dtype."""
    mk = ck < Kd
    xt = tl.load(x + rows[:, None] * Kd + ck[None, :], mask=(rows < B)[:, None] & mk[None, :], other=0.0)
    if NORM > 0:
        xf = xt.to(tl.float32) * r[:, None]
        if NORM == 2:
            xf = xf * tl.load(nw + ck, mask=mk, other=0.0).to(tl.float32)[None, :]
        xt = xf.to(wt0.dtype)
    if DOT:
        acc0 += tl.dot(xt, tl.trans(wt0), input_precision=DOT_PREC)
        if TWO:
            acc1 += tl.dot(xt, tl.trans(wt1), input_precision=DOT_PREC)
    else:
        xe = xt.to(tl.float32)[:, None, :]
        acc0 += xe * wt0.to(tl.float32)[None, :, :]
        if TWO:
            acc1 += xe * wt1.to(tl.float32)[None, :, :]
    return acc0, acc1


@triton.jit
def _after_previous_kernel(PDL: tl.constexpr):
    """With programmatic dependent launch (PDL), this kernel starts while the previous one in the
    stream finishes: what comes before this call may read only what no kernel of the step writes
    (the weights; the state, which only this layer's recurrent step writes, one token earlier).
    Here it waits for the previous kernel's writes, then lets the next kernel start in turn."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _matvec(x, nw, w0, w1, rows, cols, B, N, Kd, eps, NORM: tl.constexpr, TWO: tl.constexpr, DOT: tl.constexpr,
            DOT_PREC: tl.constexpr, PDL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """fp32 [BLOCK_B, BLOCK_N] tiles of norm(x) W0^T (and W1^T where TWO) for rows of x [B, Kd]
    and output columns `cols` of W [N, Kd]; the norm's 1 / rms of each row over the whole row
    first (`_rstd`). The first K slice of the weights is loaded before the wait for the previous
    kernel (PDL). SPLIT_K > 1: only split s = tl.program_id(2)'s K slices, [s nk / SPLIT_K,
    (s + 1) nk / SPLIT_K) of nk = cdiv(Kd, BLOCK_K), at least one (the host caps SPLIT_K at nk)."""
    if DOT:
        acc0 = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    else:  # elementwise products kept per K lane, summed once after the loop
        acc0 = tl.zeros([BLOCK_B, BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc1 = acc0
    k_lo = 0
    k_hi = Kd
    if SPLIT_K > 1:
        nk = tl.cdiv(Kd, BLOCK_K)
        k_lo = tl.program_id(2) * nk // SPLIT_K * BLOCK_K
        k_hi = (tl.program_id(2) + 1) * nk // SPLIT_K * BLOCK_K
    ck = k_lo + tl.arange(0, BLOCK_K)
    wt0, wt1 = _w_tiles(w0, w1, cols, N, Kd, ck, TWO)
    _after_previous_kernel(PDL)
    r = tl.zeros([BLOCK_B], dtype=tl.float32)
    if NORM > 0:
        r = _rstd(x, rows, B, Kd, eps, BLOCK_B, BLOCK_K)
    acc0, acc1 = _mv_slice(acc0, acc1, x, nw, r, wt0, wt1, rows, B, Kd, ck, NORM, TWO, DOT, DOT_PREC)
    for k0 in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
        ck = k0 + tl.arange(0, BLOCK_K)
        wt0, wt1 = _w_tiles(w0, w1, cols, N, Kd, ck, TWO)
        acc0, acc1 = _mv_slice(acc0, acc1, x, nw, r, wt0, wt1, rows, B, Kd, ck, NORM, TWO, DOT, DOT_PREC)
    if not DOT:
        acc0 = tl.sum(acc0, 2)
        if TWO:
            acc1 = tl.sum(acc1, 2)
    return acc0, acc1


@triton.jit
def _split_sum(acc0, acc1, ws, cnt, TWO: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_B: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """(last, acc0, acc1): whether this program of the tile's SPLIT_K arrives last, and if so the
    sums of all SPLIT_K partials in the order s = 0, 1, ..: the same bits whichever arrives last.
    Each program stores its partials at ws[tile, s] (fp32, [tiles, SPLIT_K, 1 + TWO, BLOCK_B,
    BLOCK_N]) and counts itself in cnt[tile]; the last puts cnt[tile] back to 0 (every program of
    the tile has counted by then; the next launch reads it after this one completes: a kernel
    boundary, or griddepcontrol.wait under PDL, which waits for the whole grid and its writes).

    Memory model: every thread stores partials, one thread performs the scalar atomic. The barrier
    (bar.sync) orders all threads' stores before the add, which is acq_rel at GPU scope: its
    release is cumulative, publishing what its thread has observed, the whole CTA's stores through
    the barrier (CUDA's __syncthreads(); __threadfence(); atomicAdd()). In the last program the
    acquire, then the barrier through which Triton hands the add's result to every thread, orders
    every thread's reads after all other programs' releases; the reads are .cg (L2, around the
    SM's L1, which is not coherent between SMs)."""
    tile = tl.program_id(0) + tl.num_programs(0) * tl.program_id(1)
    size: tl.constexpr = BLOCK_B * BLOCK_N
    t = tl.arange(0, BLOCK_B)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    part = ws + tile * (SPLIT_K * (1 + TWO) * size)
    mine = part + tl.program_id(2) * ((1 + TWO) * size) + t
    tl.store(mine, acc0)
    if TWO:
        tl.store(mine + size, acc1)
    tl.debug_barrier()
    last = tl.atomic_add(cnt + tile, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1
    if last:
        acc0 = tl.load(part + t, cache_modifier=".cg")
        if TWO:
            acc1 = tl.load(part + size + t, cache_modifier=".cg")
        for s in tl.static_range(1, SPLIT_K):
            acc0 += tl.load(part + s * ((1 + TWO) * size) + t, cache_modifier=".cg")
            if TWO:
                acc1 += tl.load(part + s * ((1 + TWO) * size) + size + t, cache_modifier=".cg")
        tl.store(cnt + tile, 0)
    return last, acc0, acc1


@triton.jit
def _matvec_kernel(x, nw, w0, w1, w2, res, out, ws, cnt, B, N, Kd, eps, NUM_W: tl.constexpr, NORM: tl.constexpr,
                   GLU: tl.constexpr, RESIDUAL: tl.constexpr, DOT: tl.constexpr, DOT_PREC: tl.constexpr,
                   PDL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr = 1):
    """out[.., rows, cols] of one of three products, by the constexprs:
    NUM_W weights, program column j: out[j // nb] = norm(x) W_{j // nb}^T     (q/f/i; o; down)
    GLU:  out = silu(norm(x) W0^T) * (norm(x) W1^T)                          (gate, up)
    RESIDUAL: out = res + the product (out may be res: only the program that stores a tile reads it).
    SPLIT_K > 1: grid axis 2 splits K; the last program of a tile finishes it (`_split_sum`, with
    the scratch ws, cnt)."""
    nb = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    which = pid // nb
    cols = (pid % nb) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    w = w0
    if NUM_W > 1:
        if which == 1:
            w = w1
        if NUM_W > 2:
            if which == 2:
                w = w2
    acc0, acc1 = _matvec(x, nw, w, w1, rows, cols, B, N, Kd, eps, NORM, GLU, DOT, DOT_PREC, PDL, BLOCK_B, BLOCK_N,
                         BLOCK_K, SPLIT_K)
    last = True
    if SPLIT_K > 1:
        last, acc0, acc1 = _split_sum(acc0, acc1, ws, cnt, GLU, SPLIT_K, BLOCK_B, BLOCK_N)
    if last:
        dt = out.dtype.element_ty
        y = acc0.to(dt)
        if GLU:  # as F.silu then the product, each rounded to the activation dtype
            g = y.to(tl.float32)
            y = ((g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * acc1.to(dt).to(tl.float32)).to(dt)
        off = rows[:, None] * N + cols[None, :]
        m = (rows < B)[:, None] & (cols < N)[None, :]
        if RESIDUAL:
            y = (tl.load(res + off, mask=m, other=0.0).to(tl.float32) + y.to(tl.float32)).to(dt)
        tl.store(out + which * B * N + off, y, mask=m)


@triton.jit
def _recurrent_kernel(qfi, lb, live, state, o, B, D, H, K, V, scale, HAS_LB: tl.constexpr, PDL: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """Row b, head h, value columns of one block: the gates from the logits (qfi [3, B, D]), the
    state tile [K, BLOCK_V] updated in place (not stored for a row not live), o = scale q^T h."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    ck = tl.arange(0, BLOCK_K)  # K is a power of two: BLOCK_K == K
    cv = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    mv = cv < V
    off = ((b * H + h) * K + ck[:, None]) * V + cv[None, :]
    s = tl.load(state + off, mask=mv[None, :], other=0.0)
    _after_previous_kernel(PDL)
    q_logit = tl.load(qfi + b * D + h * K + ck).to(tl.float32)
    f_logit = tl.load(qfi + B * D + b * D + h * K + ck).to(tl.float32)
    v = tl.load(qfi + 2 * B * D + b * D + h * V + cv, mask=mv, other=0.0).to(tl.float32)
    alive = tl.load(live + b + ck * 0) != 0  # the row's flag along K: a mask of the tile's shape below
    f_logit = tl.where(alive, f_logit, _MASKED)
    # q = silu(q_logit) in the activation dtype, then fp32 and the scale, as hgrn2_recurrent_step
    q = (q_logit / (1.0 + tl.exp(-q_logit))).to(qfi.dtype.element_ty).to(tl.float32) * scale
    g = tl.reshape(_log_gate(f_logit[None, :], lb + h * K, ck, HAS_LB), [BLOCK_K])  # log f, fp32
    k = -_expm1(g)  # 1 - f, accurate when f is close to 1
    s = tl.exp(g)[:, None] * s + k[:, None] * v[None, :]
    tl.store(state + off, s, mask=alive[:, None] & mv[None, :])
    out = tl.sum(q[:, None] * s, 0)
    tl.store(o + b * D + h * V + cv, out.to(o.dtype.element_ty), mask=mv)


# ----------------------------------------------------------------------------------------------
# Wrappers: argument checks, launch settings, the reference where no kernel can run
# ----------------------------------------------------------------------------------------------


# Programmatic dependent launch (Hopper on): each kernel launched while the previous one finishes,
# its first weight slice loaded before it waits (`_after_previous_kernel`). Off: plain launches.
USE_PDL = True


def _pdl(t: torch.Tensor) -> bool:
    """Whether t's kernels launch with PDL: USE_PDL, on a GPU of compute capability 9 or more."""
    return USE_PDL and t.is_cuda and _capability(t.device.index if t.device.index is not None
                                                 else torch.cuda.current_device()) >= 9


@functools.cache
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _runs_kernels(t: torch.Tensor) -> bool:
    return t.is_cuda or (_INTERPRETING and t.device.type == "cpu")


def _launch_matvec(kernel: str, x, norm_weight, eps, weights, out, residual, norm: bool, glu: bool) -> None:
    B, Kd = x.shape
    N = weights[0].shape[0]
    s = launch_settings(kernel, B)
    split = min(s.pop("SPLIT_K", 1), cdiv(Kd, s["BLOCK_K"]))  # every split at least one K slice
    dot = B >= DOT_MIN_BATCH
    nw = norm_weight if norm_weight is not None else x  # never read without a weight
    w = list(weights) + [weights[0]] * (3 - len(weights))  # unused pointers are never read
    num_w = 1 if glu else len(weights)
    grid = (num_w * cdiv(N, s["BLOCK_N"]), cdiv(B, s["BLOCK_B"]), split)
    ws = cnt = x  # never read without a split
    if split > 1:
        tiles = grid[0] * grid[1]
        ws, cnt = split_scratch(x.device, tiles * split * (1 + glu) * s["BLOCK_B"] * s["BLOCK_N"], tiles)
    pdl = _pdl(x)
    _matvec_kernel[grid](x, nw, w[0], w[1], w[2], residual if residual is not None else out, out, ws, cnt, B, N,
                         Kd, float(eps), NUM_W=num_w, NORM=(0 if not norm else 2 if norm_weight is not None else 1),
                         GLU=glu, RESIDUAL=residual is not None, DOT=dot,
                         DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32", PDL=pdl, SPLIT_K=split,
                         launch_pdl=pdl, **s)


def norm_matvec(x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, weights, out: torch.Tensor):
    """out [len(weights), B, N] = rmsnorm(x) W^T for each of 1 to 3 weights [N, D] (kernel 1)."""
    B, D = check_x(x)
    if not 1 <= len(weights) <= 3:
        raise ValueError(f"weights must hold 1 to 3 matrices, got {len(weights)}")
    N = weights[0].shape[0] if weights[0].dim() == 2 else -1
    for j, w in enumerate(weights):
        check_2d(f"weights[{j}]", w, N, D, x.dtype, x.device)
    check_norm_weight("norm_weight", norm_weight, D, x.device)
    if not isinstance(out, torch.Tensor) or out.shape != (len(weights), B, N) or out.dtype != x.dtype \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} [{len(weights)}, {B}, {N}] tensor")
    if not _runs_kernels(x):
        return out.copy_(norm_matvec_ref(x, norm_weight, eps, weights))
    _launch_matvec("qfi", x, norm_weight, eps, weights, out, None, norm=True, glu=False)
    return out


def norm_matvec_add(x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, weight: torch.Tensor,
                    residual: torch.Tensor) -> torch.Tensor:
    """residual += rmsnorm(x) W^T in place, W [N, D] (kernel 3: g_norm, o_proj, the residual)."""
    return _matvec_add("o", x, True, norm_weight, eps, weight, residual)


def matvec_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual += x W^T in place, W [N, I] (kernel 5: down_proj and the residual)."""
    return _matvec_add("down", x, False, None, 0.0, weight, residual)


def _matvec_add(kernel, x, norm: bool, norm_weight, eps, weight, residual) -> torch.Tensor:
    B, D = check_x(x)
    check_norm_weight("norm_weight", norm_weight, D, x.device)
    check_2d("weight", weight, None, D, x.dtype, x.device)
    check_2d("residual", residual, B, weight.shape[0], x.dtype, x.device)
    if not _runs_kernels(x):
        if norm:
            return residual.copy_(norm_matvec_add_ref(x, norm_weight, eps, weight, residual))
        return residual.copy_(matvec_add_ref(x, weight, residual))
    _launch_matvec(kernel, x, norm_weight, eps, [weight], residual, residual, norm=norm, glu=False)
    return residual


def norm_glu(x: torch.Tensor, norm_weight, eps: float, gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor):
    """out [B, I] = silu(rmsnorm(x) gate^T) * (rmsnorm(x) up^T), gate and up [I, D] (kernel 4)."""
    B, D = check_x(x)
    check_norm_weight("norm_weight", norm_weight, D, x.device)
    check_2d("gate", gate, None, D, x.dtype, x.device)
    check_2d("up", up, gate.shape[0], D, x.dtype, x.device)
    check_2d("out", out, B, gate.shape[0], x.dtype, x.device)
    if not _runs_kernels(x):
        return out.copy_(norm_glu_ref(x, norm_weight, eps, gate, up))
    _launch_matvec("glu", x, norm_weight, eps, [gate, up], out, None, norm=True, glu=True)
    return out


def recurrent_step(qfi: torch.Tensor, lower_bound: torch.Tensor | None, live: torch.Tensor, state: torch.Tensor,
                   o: torch.Tensor, scale: float):
    """The gates and one recurrent step (kernel 2): qfi [3, B, D] (q, f, i logits), lower_bound [D]
    fp32 or None, live [B] bool (a row not live keeps its state exactly), state [B, H, K, V] fp32
    updated in place, o [B, D] written. K = V must be a power of two. Returns o."""
    if not isinstance(state, torch.Tensor) or state.dim() != 4 or state.dtype != torch.float32 \
            or not state.is_contiguous():
        raise ValueError("state must be a contiguous float32 [B, H, K, V] tensor")
    B, H, K, V = state.shape
    D = H * K
    if K & (K - 1) or H * V != D:
        raise ValueError(f"state must have K a power of two and K = V, got [B, H, K, V] = {list(state.shape)}")
    if not isinstance(qfi, torch.Tensor) or qfi.shape != (3, B, D) or not qfi.is_contiguous() \
            or qfi.device != state.device:
        raise ValueError(f"qfi must be a contiguous [3, {B}, {D}] tensor on {state.device}")
    check_2d("o", o, B, D, qfi.dtype, state.device)
    if not isinstance(live, torch.Tensor) or live.shape != (B,) or live.dtype != torch.bool:
        raise ValueError(f"live must be a bool [{B}] tensor")
    if lower_bound is not None and (lower_bound.shape != (D,) or lower_bound.dtype != torch.float32
                                    or not lower_bound.is_contiguous()):
        raise ValueError(f"lower_bound must be None or a contiguous float32 [{D}] tensor")
    if not _runs_kernels(state):
        new_o, new = recurrent_step_ref(qfi, lower_bound, live, state, scale)
        state.copy_(torch.where(live[:, None, None, None], new, state))
        return o.copy_(new_o)
    s = launch_settings("state", B)
    BV = min(s["BLOCK_V"], triton.next_power_of_2(V))
    pdl = _pdl(state)
    _recurrent_kernel[(B, H, cdiv(V, BV))](
        qfi, lower_bound if lower_bound is not None else state, live.view(torch.uint8), state, o, B, D, H, K, V,
        float(scale), HAS_LB=lower_bound is not None, PDL=pdl, BLOCK_K=K, BLOCK_V=BV, num_warps=s["num_warps"],
        launch_pdl=pdl)
    return o

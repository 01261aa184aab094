"""The recurrence at K = V = 1 (HGRN1: HGRN2 at expand_ratio 1): one state per channel, a
sequential scan over T in Triton, forward and backward, with its PyTorch form beside it.

Per channel c of [B, T, H] (heads of one key and one value are channels),

    h_t = f_t h_{t-1} + k_t v_t,   k_t = 1 - f_t,      y_t = scale q_t h_t

Backward, walking from the end with a carry c = f_{t+1} dh_{t+1} (c = dht at t = T - 1):

    dh_t = scale q_t dy_t + c      dq_t = scale dy_t h_t      dv_t = k_t dh_t
    dF_t = dh_t (h_{t-1} - v_t)    (the gradient of f_t, through f and k = 1 - f)
    dh0  = f_0 dh_0

and then the gates: the plain op's g = log f gets dg = f dF; the gated op's logits get
dq_logits = dq silu'(q_logits), df_logits = dF (1 - lb) s (1 - s), dlb = sum over (b, t) of
dF (1 - s), with s = sigmoid(f_logits). These are the derivatives `gates_bwd` applies, with its
dg = f dF substituted, so no exp(-g) appears.

The chunk kernels take K, V >= 16 only; at K = V = 1 their matmuls would be 1 x 1. Here a program
takes a [BB, BD] tile of (batch, channel) and walks T one step at a time: every step is an exact
multiply-add, so a masked step (f = 1, k = 0 exactly) leaves the state bit for bit.

The gates come from the logits in fp32 as `kernels.gates` defines them, f = lb + (1 - lb) s, but
directly rather than through g = log f: the scan needs f and 1 - f, each exact to an ulp this way,
1 - f = (1 - lb) sigmoid(-f_logits) and f = 1 - (1 - f) where f >= 1/2, which gives f = 1
exactly where the logit is 1e4 (padding).

The backward takes the forward's states h [B, T, H] in fp32 (the op's third output): the reverse
walk needs h_{t-1} at every step, and recomputing it would write the same tensor to memory
anyway, in one more sequential pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from hgrn2mini.kernels.gates import _INTERPRETING
from hgrn2mini.kernels.launch import launcher, plain_eager
from hgrn2mini.kernels.settings import cdiv
from hgrn2mini.kernels.tiles import _expm1


def takes(x: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the op runs this scan: heads of K = V = 1 (x: q, or the logits viewed [B, T, H, K])
    on CUDA, or under Triton's interpreter (CPU tests), where traced calls (compile, fake tensors)
    take the PyTorch form of the scan: the interpreter runs eager launches only."""
    return x.shape[-1] == 1 and v.shape[-1] == 1 and (x.is_cuda or _INTERPRETING)


def _triton(*tensors) -> bool:
    return tensors[0].is_cuda or plain_eager(*tensors)


# ---- the PyTorch form (float64-friendly; the path of traced calls under the interpreter) -------


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gate_values(q_in, f_in, lower_bound, gated: bool, acc: torch.dtype):
    """(q, f, k = 1 - f) in acc from the op's inputs: the logits (gated) or q and g = log f."""
    if not gated:
        g = f_in.to(acc)
        return q_in.to(acc), g.exp(), -torch.expm1(g)
    x = f_in.to(acc)
    lb = lower_bound.to(acc) if lower_bound is not None else torch.zeros((), dtype=acc, device=x.device)
    k = (1 - lb) * torch.sigmoid(-x)
    f = torch.where(x >= 0, 1 - k, lb + (1 - lb) * torch.sigmoid(x))
    return F.silu(q_in.to(acc)), f, k


def scan_ref(q, f, k, v, h0, scale):
    """y = scale q h and every state h [B, T, H], from q, f, k, v [B, T, H] and h0 [B, H]."""
    h, states = h0, []
    for t in range(q.shape[1]):
        h = f[:, t] * h + k[:, t] * v[:, t]
        states.append(h)
    states = torch.stack(states, 1) if states else q.new_empty(q.shape)
    return scale * q * states, states


def scan_bwd_ref(q, f, k, v, h0, states, dy, dht, scale):
    """(dq, dF, dv, dh0) of `scan_ref`, dF the gradient of f (through f and k = 1 - f)."""
    c = dht if dht is not None else torch.zeros_like(h0)
    dh = []
    for t in reversed(range(q.shape[1])):
        d = scale * q[:, t] * dy[:, t] + c
        c = f[:, t] * d
        dh.append(d)
    dh = torch.stack(dh[::-1], 1) if dh else q.new_empty(q.shape)
    before = torch.cat([h0[:, None], states[:, :-1]], 1)
    return scale * dy * states, dh * (before - v), k * dh, c


def _fwd_torch(q_in, f_in, lb, v, h0, scale, gated):
    acc = _acc(v)
    q, f, k = gate_values(q_in, f_in, lb, gated, acc)
    h0 = h0.to(acc) if h0 is not None else q.new_zeros(q.shape[0], q.shape[2])
    y, states = scan_ref(q, f, k, v.to(acc), h0, scale)
    return y.to(v.dtype), (states[:, -1] if states.shape[1] else h0).clone(), states


def _bwd_torch(q_in, f_in, lb, v, h0, states, dy, dht, scale, gated):
    acc = _acc(v)
    q, f, k = gate_values(q_in, f_in, lb, gated, acc)
    h0 = h0.to(acc) if h0 is not None else q.new_zeros(q.shape[0], q.shape[2])
    dht = dht.to(acc) if dht is not None else None
    dq, dF, dv, dh0 = scan_bwd_ref(q, f, k, v.to(acc), h0, states.to(acc), dy.to(acc), dht, scale)
    if not gated:
        return dq.to(q_in.dtype), f * dF, dv.to(v.dtype), None, dh0
    x, s = q_in.to(acc), torch.sigmoid(q_in.to(acc))
    one_minus_lb = 1 - lb.to(acc) if lb is not None else 1.0
    fx = f_in.to(acc)
    df = dF * one_minus_lb * torch.sigmoid(fx) * torch.sigmoid(-fx)
    dlb = (dF * torch.sigmoid(-fx)).sum((0, 1)) if lb is not None else None
    return (dq * s * (1 + x * (1 - s))).to(q_in.dtype), df.to(f_in.dtype), dv.to(v.dtype), dlb, dh0


# ---- the Triton kernels -------------------------------------------------------------------------


@triton.jit
def _gates(qi, fi, lb, GATED: tl.constexpr, HAS_LB: tl.constexpr):
    """(q, f, k) in fp32 from loaded fp32 tiles: q and g = log f (plain), or the logits (gated;
    lb: the bound's tile, [1, BD]), as `gate_values`."""
    if GATED:
        e = tl.exp(-tl.abs(fi))  # sigmoid(+-x) from one exp(-|x|): never overflows
        s = tl.where(fi >= 0.0, 1.0, e) / (1.0 + e)
        k = tl.where(fi >= 0.0, e, 1.0) / (1.0 + e)
        if HAS_LB:
            k = (1.0 - lb) * k
            f = tl.where(fi >= 0.0, 1.0 - k, lb + (1.0 - lb) * s)
        else:
            f = tl.where(fi >= 0.0, 1.0 - k, s)
        q = qi / (1.0 + tl.exp(-qi))
    else:
        q = qi
        f = tl.exp(fi)
        k = -_expm1(fi)
    return q, f, k


@triton.jit
def _tile(pid_b, pid_c, B, T, H, BB: tl.constexpr, BD: tl.constexpr):
    """A program's (batch, channel) tile: offsets of step 0 in [B, T, H], of [B, H], the mask."""
    rows = pid_b * BB + tl.arange(0, BB)
    cols = pid_c * BD + tl.arange(0, BD)
    m = (rows[:, None] < B) & (cols[None, :] < H)
    seq = rows[:, None].to(tl.int64) * T * H + cols[None, :]
    return seq, rows[:, None] * H + cols[None, :], cols, m


@triton.jit
def _fwd_kernel(q, f, lb, v, h0, y, states, hT, B, T, H, scale, GATED: tl.constexpr, HAS_LB: tl.constexpr,
                HAS_H0: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr):
    seq, bh, cols, m = _tile(tl.program_id(0), tl.program_id(1), B, T, H, BB, BD)
    scale = tl.full([], scale, tl.float32)  # fp64 when Inductor launches the kernel from a compiled graph
    bound = tl.zeros([1, BD], dtype=tl.float32)
    if HAS_LB:
        bound = tl.load(lb + cols[None, :], mask=cols[None, :] < H, other=0.0)
    h = tl.zeros([BB, BD], dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0 + bh, mask=m, other=0.0)
    for t in range(T):
        off = seq + t * H
        qt, ft, kt = _gates(tl.load(q + off, mask=m, other=0.0).to(tl.float32),
                            tl.load(f + off, mask=m, other=0.0).to(tl.float32), bound, GATED, HAS_LB)
        h = ft * h + kt * tl.load(v + off, mask=m, other=0.0).to(tl.float32)
        tl.store(y + off, (scale * qt * h).to(y.dtype.element_ty), mask=m)
        tl.store(states + off, h, mask=m)
    tl.store(hT + bh, h, mask=m)


@triton.jit
def _bwd_kernel(q, f, lb, v, h0, states, dy, dht, dq, df, dv, dh0, dlb_part, B, T, H, scale,
                GATED: tl.constexpr, HAS_LB: tl.constexpr, HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr,
                BB: tl.constexpr, BD: tl.constexpr):
    """The reverse walk; df is dg (plain) or d f_logits (gated), dq is d q_logits (gated)."""
    seq, bh, cols, m = _tile(tl.program_id(0), tl.program_id(1), B, T, H, BB, BD)
    scale = tl.full([], scale, tl.float32)  # fp64 when Inductor launches the kernel from a compiled graph
    bound = tl.zeros([1, BD], dtype=tl.float32)
    if HAS_LB:
        bound = tl.load(lb + cols[None, :], mask=cols[None, :] < H, other=0.0)
    first = tl.zeros([BB, BD], dtype=tl.float32)  # h before step 0
    if HAS_H0:
        first = tl.load(h0 + bh, mask=m, other=0.0)
    c = tl.zeros([BB, BD], dtype=tl.float32)  # f_{t+1} dh_{t+1}
    if HAS_DHT:
        c = tl.load(dht + bh, mask=m, other=0.0)
    dlb = tl.zeros([BB, BD], dtype=tl.float32)
    h = tl.load(states + seq + (T - 1) * H, mask=m, other=0.0)  # h_t, walking back (T >= 1)
    for i in range(T):
        t = T - 1 - i
        off = seq + t * H
        qi = tl.load(q + off, mask=m, other=0.0).to(tl.float32)
        fi = tl.load(f + off, mask=m, other=0.0).to(tl.float32)
        vt = tl.load(v + off, mask=m, other=0.0).to(tl.float32)
        dyt = tl.load(dy + off, mask=m, other=0.0).to(tl.float32)
        later = off > seq  # t > 0, as a tile (t is a plain int under the interpreter)
        before = tl.where(later, tl.load(states + off - H, mask=m & later, other=0.0), first)
        qt, ft, kt = _gates(qi, fi, bound, GATED, HAS_LB)
        dh = scale * qt * dyt + c
        dqt = scale * dyt * h
        dF = dh * (before - vt)
        c = ft * dh
        if GATED:
            sq = 1.0 / (1.0 + tl.exp(-qi))
            dqt = dqt * sq * (1.0 + qi * (1.0 - sq))
            e = tl.exp(-tl.abs(fi))
            s_neg = tl.where(fi >= 0.0, e, 1.0) / (1.0 + e)
            # (1 - lb) s (1 - s) = s k: the gated k is (1 - lb) sigmoid(-f_logits)
            dft = dF * kt * (tl.where(fi >= 0.0, 1.0, e) / (1.0 + e))
            dlb += tl.where(m, dF * s_neg, 0.0)
        else:
            dft = ft * dF
        tl.store(dq + off, dqt.to(dq.dtype.element_ty), mask=m)
        tl.store(df + off, dft.to(df.dtype.element_ty), mask=m)
        tl.store(dv + off, (kt * dh).to(dv.dtype.element_ty), mask=m)
        h = before
    tl.store(dh0 + bh, c, mask=m)
    if HAS_LB:
        tl.store(dlb_part + tl.program_id(0) * H + cols, tl.sum(dlb, 0), mask=cols < H)


def _blocks(B: int, H: int, device: torch.device):
    """(BB, BD, warps). On the GPU one batch row a program, 64 channels over 2 warps, whatever H
    (fixed, so that dynamic shapes add no guard): B * H / 64 programs, each latency-bound on its
    walk, all resident at once at training sizes. The interpreter runs programs one after another
    in Python: there one program takes every row and channel."""
    if device.type != "cuda":
        return triton.next_power_of_2(B), triton.next_power_of_2(H), 1
    return 1, 64, 2


def _flat(x):
    """[B, T, H] (or [B, T, H, 1]) contiguous, for the kernels' dense indexing."""
    return x.reshape(x.shape[0], x.shape[1], -1).contiguous()


def forward(q_in, f_in, lower_bound, v, initial_state, scale, gated):
    """(y [B, T, H, 1] in v's dtype, final state [B, H, 1, 1] fp32, states [B, T, H] fp32).
    q_in, f_in: q and g = log f [B, T, H, 1] (plain), or the logits [B, T, H] (gated)."""
    B, T, H, _ = v.shape
    if not _triton(q_in, f_in, lower_bound, v, initial_state):
        y, hT, states = _fwd_torch(_flat(q_in), _flat(f_in), lower_bound, _flat(v),
                                   _flat(initial_state)[..., 0] if initial_state is not None else None,
                                   scale, gated)
        return y.view(B, T, H, 1), hT.contiguous().view(B, H, 1, 1), states
    q_in, f_in, v = _flat(q_in), _flat(f_in), _flat(v)
    y = torch.empty_like(v)
    states = torch.empty(B, T, H, device=v.device, dtype=torch.float32)
    hT = torch.empty(B, H, 1, 1, device=v.device, dtype=torch.float32)
    # Placeholders for absent inputs: never read, and an input, never an output (torch's analysis of
    # what a kernel writes, which torch.compile trusts, should see each output once).
    h0 = initial_state.contiguous() if initial_state is not None else v
    lb = lower_bound.contiguous() if lower_bound is not None else v
    BB, BD, warps = _blocks(B, H, v.device)
    launcher(_fwd_kernel)[(cdiv(B, BB), cdiv(H, BD))](
        q_in, f_in, lb, v, h0, y, states, hT, B, T, H, scale, GATED=gated, HAS_LB=lower_bound is not None,
        HAS_H0=initial_state is not None, BB=BB, BD=BD, num_warps=warps)
    return y.view(B, T, H, 1), hT, states


def backward(q_in, f_in, lower_bound, v, initial_state, states, dy, dht, scale, gated):
    """Gradients of `forward`: (d q_in, d f_in, dv, d lower_bound or None, d initial state
    [B, H, 1, 1] fp32). states: the forward's [B, T, H] fp32, or None to compute them again."""
    B, T, H, _ = v.shape
    shapes = (q_in.shape, f_in.shape, v.shape)
    if states is None:
        states = forward(q_in, f_in, lower_bound, v, initial_state, scale, gated)[2]
    # T = 0 by the PyTorch form too: the kernel starts from h at step T - 1.
    if T == 0 or not _triton(q_in, f_in, lower_bound, v, initial_state, states, dy, dht):
        h0 = _flat(initial_state)[..., 0] if initial_state is not None else None
        dq, df, dv, dlb, dh0 = _bwd_torch(_flat(q_in), _flat(f_in), lower_bound, _flat(v), h0, states,
                                          _flat(dy), _flat(dht)[..., 0] if dht is not None else None, scale, gated)
        return dq.view(shapes[0]), df.view(shapes[1]), dv.view(shapes[2]), dlb, dh0.view(B, H, 1, 1)
    # Gradients can arrive with stride 0 (the gradient of `.sum()`): _flat makes them dense.
    q_in, f_in, v, dy = _flat(q_in), _flat(f_in), _flat(v), _flat(dy)
    states = states.contiguous()
    dq = torch.empty_like(q_in)
    df = torch.empty(f_in.shape, device=v.device, dtype=f_in.dtype if gated else torch.float32)
    dv = torch.empty_like(v)
    dh0 = torch.empty(B, H, 1, 1, device=v.device, dtype=torch.float32)
    BB, BD, warps = _blocks(B, H, v.device)
    grid = (cdiv(B, BB), cdiv(H, BD))
    has_lb = lower_bound is not None
    dlb_part = torch.empty(grid[0] if has_lb else 0, H, device=v.device, dtype=torch.float32)
    h0 = initial_state.contiguous() if initial_state is not None else v  # placeholders, as in forward
    dht_in = dht.contiguous() if dht is not None else v
    lb = lower_bound.contiguous() if has_lb else v
    launcher(_bwd_kernel)[grid](
        q_in, f_in, lb, v, h0, states, dy, dht_in, dq, df, dv, dh0, dlb_part, B, T, H, scale, GATED=gated,
        HAS_LB=has_lb, HAS_H0=initial_state is not None, HAS_DHT=dht is not None, BB=BB, BD=BD, num_warps=warps)
    dlb = dlb_part.sum(0) if has_lb else None
    return dq.view(shapes[0]), df.view(shapes[1]), dv.view(shapes[2]), dlb, dh0

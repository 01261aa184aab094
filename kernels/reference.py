"""The chunked HGRN2 recurrence in plain PyTorch: the op's CPU path, and the algorithm the Triton
kernels (`state.py`, `out.py`, `dqg.py`, put together in `chunk.py`) compute.

Per head, with the key tied to the forget gate (k = 1 - f = -expm1(g), g = log f <= 0):

    h_t = exp(g_t)[:, None] * h_{t-1} + k_t[:, None] * v_t[None, :]      h_t: [K, V]
    o_t = (scale * q_t) @ h_t                                               o_t: [V]

Forward, in chunks of C steps (n indexes chunks, i and j steps inside one):

 1. Cumulative gate inside each chunk, fp32: b = cumsum(g), decreasing; b_last = b at its last step.
 2. In-chunk pairs (masked to j <= i in log space *before* exp, so every exponent evaluated is
    <= 0, and gates of g = -30 a step give exact zeros instead of inf * 0 = NaN):
        A_ij = sum_k scale q_i[k] k_j[k] exp(b_i[k] - b_j[k])
 3. State walk over the chunks (the only sequential step):
        h_end = exp(b_last)[:, None] * h_start + (k * exp(b_last - b))^T @ v
 4. Output, from the chunk-start state and the pairs:
        o_i = (scale q_i * exp(b_i)) @ h_start + sum_{j<=i} A_ij v_j

Backward (do = dL/do, dht = dL/dh_final):

 5. Reverse walk: dh_end[n], the gradient of chunk n's end state from later chunks, from
        dh_start = exp(b_last) * dh_end + (scale q exp(b))^T @ do,    dh_end[last] = dht
 6. dv = (k exp(b_last - b)) @ dh_end + A^T @ do  (step 4 transposed), with dA = do v^T.
 7. dq, dk through the states and the pairs:
        dq = dq_h + scale * sum_{j<=i} dA_ij k_j exp(b_i - b_j),    dq_h = scale exp(b) * (do @ h_start^T)
        dk = dk_h + sum_{i>=j} dA_ij scale q_i exp(b_i - b_j),       dk_h = exp(b_last - b) * (v @ dh_end^T)
 8. dg, from dg_t = exp(g_t) * (rowsum(dh_t * h_{t-1}) - dk_t) split over where dh_t and h_{t-1}
    come from (outside the chunk or inside it):
        dg_t = exp(b_last) rowsum(dh_end * h_start)
             + sum_{j<t} k_j dk_h_j  +  sum_{i>=t} q_i dq_h_i
             + sum_{i>=t} (q_i dq'_i - k_i dk'_i)            (dq', dk': pair sums over j < i only)
             - exp(g_t) dk_t

Step 8 is the usual gated-linear-attention form, revcumsum(q*dq - k*dk) plus a carry, regrouped:
that form lets O(1) terms (the diagonal pairs, the last key against the chunk-end state) cancel,
which leaves absolute rounding error ~1e-7 on a dg that is ~exp(g), all of it error when gates are
near 0. Written as above every term carries its own decay, so dg keeps its relative accuracy
there, and no pass over the whole sequence is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The [C, C, K] pair tensor is what this path pays for exactness, against a sequential loop over
# T / C chunks: C = 8 is the fastest balance on a CPU.
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

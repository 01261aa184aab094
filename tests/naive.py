"""Independent references for the tests: the HGRN2 recurrence one step at a time, in float64."""

import torch


def naive_recurrence(q, g, v, h0=None, scale=None):
    """h_t = exp(g_t) h_{t-1} + (1 - exp(g_t)) v_t^T (outer product), o_t = scale q_t h_t.

    q, g: [B, T, H, K]; v: [B, T, H, V]; h0: [B, H, K, V] or None. Differentiable (autograd).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    h = h0 if h0 is not None else q.new_zeros(B, H, K, V)
    outs = []
    for t in range(T):
        f = g[:, t].exp()  # [B, H, K]
        h = f[..., None] * h + (1 - f)[..., None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, h))
    return torch.stack(outs, 1), h


def gates(f_logits, lower_bound):
    """HGRN2's log forget gate g = log(lb + (1 - lb) sigmoid(f)) in float64."""
    ls = torch.nn.functional.logsigmoid(f_logits)
    if lower_bound == 0:
        return ls
    lb = torch.full_like(f_logits, lower_bound)
    return torch.logaddexp(lb.log(), torch.log1p(-lb) + ls)


def rel_err(got, want):
    """||got - want|| / ||want|| in float64; NaN or inf anywhere in got gives inf."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    den = want.norm()
    return ((got - want).norm() / (den if den > 0 else 1.0)).item()

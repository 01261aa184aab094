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


def gated_reference(y, x, lb, v, h0, do, dht, scale=None):
    """The gated recurrence (q = silu(y), g = log(lb + (1 - lb) sigmoid(x)), logits [B, T, H*K],
    lb [H*K] or None) in float64: the 7 outputs of GATED_NAMES (o, final state, and the gradients
    of sum(o * do) + sum(hT * dht) for y, x, lb (None without one), v, h0), and the scales
    `gated_errors` measures two of them by. The recurrence's gradients come from autograd through
    the loop; the gates' derivatives are applied by hand, from the definition, with log f exact
    near 1 too (log1p(-(1 - lb) sigmoid(-x))), where f itself rounds to 1."""
    y, x, v, do, dht = (t.double() for t in (y, x, v, do, dht))
    h0 = h0.double() if h0 is not None else None
    B, T, H, V = v.shape
    K = y.shape[-1] // H
    lb64 = lb.double() if lb is not None else torch.zeros(H * K, dtype=torch.float64, device=y.device)
    f = lb64 + (1 - lb64) * torch.sigmoid(x)
    log_f = torch.where(f < 0.5, torch.log(f), torch.log1p(-(1 - lb64) * torch.sigmoid(-x)))
    s_y = torch.sigmoid(y)
    leaves = [(y * s_y).view(B, T, H, K).requires_grad_(), log_f.view(B, T, H, K).requires_grad_(),
              v.clone().requires_grad_()]
    h0r = h0.clone().requires_grad_() if h0 is not None else None
    o, hT = naive_recurrence(*leaves, h0r, scale)
    grads = torch.autograd.grad((o * do).sum() + (hT * dht).sum(), leaves + ([h0r] if h0r is not None else []))
    dq, dg = grads[0].reshape(y.shape), grads[1].reshape(x.shape)
    dy = dq * (s_y + y * s_y * (1 - s_y))
    dx_weight = (1 - lb64) * torch.sigmoid(x) * torch.sigmoid(-x) / f
    dx = dg * dx_weight
    terms = dg * torch.sigmoid(-x) / f
    dlb = terms.sum((0, 1)) if lb is not None else None
    dlb_scale = terms.abs().sum((0, 1)) if lb is not None else None
    outputs = (o.detach(), hT.detach(), dy, dx, dlb, grads[2], (grads[3] if h0 is not None else None))
    return outputs, {"dlb": dlb_scale, "df_logits": dx_weight}


GATED_NAMES = ("o", "final_state", "dq_logits", "df_logits", "dlb", "dv", "dh0")


def gated_errors(got, want, scales, elementwise):
    """Relative errors, by name, of the gated op's outputs `got` against `gated_reference`'s.

    Two outputs are not measured by the plain norm of `rel_err`:
    - dlb, a sum over every token whose terms can cancel (3.3x on a drawn bf16 problem): against
      the sum of the terms' magnitudes (the condition of a sum), `rel_err_sum`.
    - df_logits = dg * w, w = (1 - lb) s (1 - s) / f exact and elementwise (s = sigmoid(x)), spans
      e^12 and more where forget logits spread around -20: its plain norm is then a few elements'
      dg, an elementwise error, which bf16 does not bound (one element of dg at 3.9% on a drawn
      problem whose dg as a whole was at 3.3e-3). It is measured as dg:
      ||(got - want) / w|| / ||want / w||, the op's norm-wise bound on dg carried through w. With
      `elementwise` (fp32, where every element is accurate) its plain norm is checked too, as
      df_logits_plain.
    """
    errs = {}
    for name, a, b in zip(GATED_NAMES, got, want):
        if b is None:
            continue
        if name == "dlb":
            errs[name] = rel_err_sum(a, b, scales["dlb"])
        elif name == "df_logits":
            w = scales["df_logits"].to(b.device)
            errs[name] = rel_err(a.double() / w, b / w)
            if elementwise:
                errs["df_logits_plain"] = rel_err(a, b)
        else:
            errs[name] = rel_err(a, b)
    return errs


def rel_err_sum(got, want, magnitudes):
    """||got - want|| / ||magnitudes|| for a sum whose terms' magnitudes sum to `magnitudes`: a sum
    computed from terms each with relative error e has at most this error e, however they cancel.
    NaN or inf in got gives inf."""
    got, want, magnitudes = (t.detach().double().cpu() for t in (got, want, magnitudes))
    if not torch.isfinite(got).all():
        return float("inf")
    den = magnitudes.norm()
    return ((got - want).norm() / (den if den > 0 else 1.0)).item()

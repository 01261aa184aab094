"""RMSNorm in one pass each way: y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 and rounded
to x's dtype (the model's norms, fla's numerics).

In eager PyTorch the fp32 formula is six elementwise and reduction kernels forward and more
backward, each a pass over [N, D] in fp32; on CUDA outside the compiler `rms_norm` runs one Triton
kernel forward (keeping 1 / rms per row) and one backward. Under torch.compile or export it is the
PyTorch formula (`rms_norm_ref`), which Inductor fuses itself.

Backward, with r = 1 / rms(x) per row, x^ = x r and u = dy w:

    dx = r (u - x^ mean(u x^))        dw = sum over rows of dy x^
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hgrn2mini.kernels.launch import _sm_count, plain_eager


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """fp32 math (fp64 for fp64 x, as references need), rounded to x's dtype."""
    y = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    return y.to(x.dtype)


@triton.jit
def _fwd_kernel(x, w, y, rstd, D, eps, HAS_W: tl.constexpr, BD: tl.constexpr):
    """One row: y = x r w and r = 1 / rms(x) (fp32, kept for the backward)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BD)
    m = cols < D
    xr = tl.load(x + row * D + cols, mask=m, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(xr * xr, 0) / D + eps)
    yr = xr * r
    if HAS_W:
        yr = yr * tl.load(w + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(y + row * D + cols, yr.to(y.dtype.element_ty), mask=m)
    tl.store(rstd + row, r)


@triton.jit
def _bwd_kernel(x, w, dy, rstd, dx, dw_part, N, D, HAS_W: tl.constexpr, BD: tl.constexpr):
    """Rows pid, pid + P, ...: dx, and this program's sum of dy x^ (dw) into dw_part[pid]."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BD)
    m = cols < D
    if HAS_W:
        wr = tl.load(w + cols, mask=m, other=0.0).to(tl.float32)
    acc = tl.zeros([BD], dtype=tl.float32)
    for row in range(pid, N, tl.num_programs(0)):
        xh = tl.load(x + row * D + cols, mask=m, other=0.0).to(tl.float32) * tl.load(rstd + row)
        g = tl.load(dy + row * D + cols, mask=m, other=0.0).to(tl.float32)
        u = g
        if HAS_W:
            u = g * wr
            acc += g * xh
        d = tl.load(rstd + row) * (u - xh * (tl.sum(u * xh, 0) / D))
        tl.store(dx + row * D + cols, d.to(dx.dtype.element_ty), mask=m)
    if HAS_W:
        tl.store(dw_part + pid * D + cols, acc, mask=m)


def _warps(BD: int) -> int:
    return 4 if BD <= 2048 else 8


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        N, D = x2.shape
        BD = triton.next_power_of_2(D)
        y = torch.empty_like(x2)
        rstd = torch.empty(N, device=x.device, dtype=torch.float32)
        w = weight.contiguous() if weight is not None else x2  # never read without a weight
        _fwd_kernel[(N,)](x2, w, y, rstd, D, eps, HAS_W=weight is not None, BD=BD, num_warps=_warps(BD))
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        N, D = x2.shape
        BD = triton.next_power_of_2(D)
        dy2 = dy.reshape(N, D).contiguous()
        dx = torch.empty_like(x2)
        # A few programs per SM, each over many rows: dw's partial sums stay few.
        sms = _sm_count(x2.device.index if x2.device.index is not None else torch.cuda.current_device()) \
            if x2.is_cuda else 4
        P = max(1, min(N, 4 * sms))
        has_w = weight is not None
        dw_part = torch.empty(P if has_w else 0, D, device=x2.device, dtype=torch.float32)
        w = weight.contiguous() if has_w else x2
        _bwd_kernel[(P,)](x2, w, dy2, rstd, dx, dw_part, N, D, HAS_W=has_w, BD=BD, num_warps=_warps(BD))
        dw = dw_part.sum(0).to(weight.dtype) if has_w and ctx.needs_input_grad[1] else None
        return dx.view(dy.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., D] with weight [D] (any float dtype) or None; the
    result in x's dtype."""
    if x.is_cuda and plain_eager(x) and x.shape[-1] <= 16384 and x.numel() > 0:
        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_ref(x, weight, eps)

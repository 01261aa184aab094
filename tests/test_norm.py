"""RMSNorm's Triton kernels (kernels/norm.py) against float64, forward and backward."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hgrn2mini.kernels import norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the kernels in Triton's interpreter
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float("inf") if not torch.isfinite(a).all() else ((a - b).norm() / b.norm()).item()


def check(N, D, dtype, with_weight, seed, device):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, D, generator=gen) * 3).to(dtype)
    w = (1 + torch.randn(D, generator=gen)) if with_weight else None
    dy = torch.randn(N, D, generator=gen).to(dtype)
    ref = [t.double().requires_grad_() if t is not None else None for t in (x, w)]
    y_ref = ref[0] * torch.rsqrt(ref[0].square().mean(-1, keepdim=True) + 1e-5)
    if with_weight:
        y_ref = y_ref * ref[1]
    y_ref.backward(dy.double())
    leaves = [t.to(device).requires_grad_() if t is not None else None for t in (x, w)]
    y = norm._RMSNorm.apply(leaves[0], leaves[1], 1e-5)
    y.backward(dy.to(device))
    assert y.dtype == dtype
    tol = TOL[dtype]
    assert rel_err(y, y_ref) < tol
    assert rel_err(leaves[0].grad, ref[0].grad) < tol
    if with_weight:
        assert rel_err(leaves[1].grad, ref[1].grad) < tol


@given(N=st.sampled_from([1, 3, 17]), D=st.sampled_from([16, 48, 128]), with_weight=st.booleans(),
       seed=st.integers(0, 2**16))
@settings(max_examples=10, deadline=None)
def test_rms_norm_kernels_match_float64(N, D, with_weight, seed):
    if DEVICE == "cpu" and not _interpreting():
        pytest.skip("the kernels run on CUDA or under TRITON_INTERPRET=1")
    check(N, D, torch.float32, with_weight, seed, DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, D", [(1, 1024), (4097, 1024), (300, 768), (64, 2048), (5, 100)])
def test_rms_norm_kernels_match_float64_cuda(N, D, dtype):
    check(N, D, dtype, True, N + D, "cuda")
    check(N, D, dtype, False, N + D + 1, "cuda")


def test_rms_norm_dispatch_uses_the_reference_off_cuda():
    x, w = torch.randn(4, 32), torch.rand(32)
    torch.testing.assert_close(norm.rms_norm(x, w, 1e-6), norm.rms_norm_ref(x, w, 1e-6), rtol=0, atol=0)


def _interpreting():
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"

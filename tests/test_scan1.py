"""The K = V = 1 scan (kernels/scan1.py: HGRN1, heads of one key and one value) through both ops,
against float64.

Without a GPU its Triton kernels run under TRITON_INTERPRET=1 (conftest.py) on small fp32 shapes;
with `-m gpu`, on CUDA at larger shapes and long sequences, fp32 and bf16. Every comparison is a
relative error against float64 (`naive.rel_err`: NaN or inf anywhere fails).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from hgrn2mini.kernels import scan1
from hypothesis import example, given, settings
from hypothesis import strategies as st
from naive import gated_errors, gated_reference, naive_recurrence, rel_err

from hgrn2mini import HGRN2Config, HGRN2ForCausalLM
from hgrn2mini.model import MASKED_F_LOGIT
from hgrn2mini.ops import chunk_hgrn2, gated_chunk_hgrn2

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
needs_kernels = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETING),
                                   reason="the scan runs on CUDA or under TRITON_INTERPRET=1")
pytestmark = needs_kernels

# fp32: a few ulps a step, which add up as a random walk over T steps (`tol`); fp16, bf16: the
# outputs and gradients are rounded to them.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def tol(dtype, T):
    return TOL[dtype] * max(1.0, (T / 100) ** 0.5) if dtype == torch.float32 else TOL[dtype]


@dataclass
class Case:
    B: int
    T: int
    H: int
    shift: float = 0.0  # mean forget logit: -20 gates near 0, +20 near 1
    lower_bound: float = 0.0  # 0: none
    masked: float = 0.0  # fraction of positions whose forget logit is MASKED_F_LOGIT (f = 1 exactly)
    with_state: bool = True
    final_grad: bool = True  # the final state's gradient given (else None)
    seed: int = 0

    def logits(self, device):
        """float64 q logits, forget logits, lower bound [H] (or None), v, h0, do, dht (or None)."""
        gen = torch.Generator().manual_seed(self.seed)
        B, T, H = self.B, self.T, self.H
        rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
        y, x = 2 * rnd(B, T, H), self.shift + 2 * rnd(B, T, H)
        x = torch.where(torch.rand(B, T, H, generator=gen, dtype=torch.float64) < self.masked, MASKED_F_LOGIT, x)
        lb = self.lower_bound * (1 - 1e-3 * torch.rand(H, generator=gen, dtype=torch.float64)) \
            if self.lower_bound else None
        v, h0, do, dht = rnd(B, T, H, 1), rnd(B, H, 1, 1), rnd(B, T, H, 1), rnd(B, H, 1, 1)
        out = [y, x, lb, v, h0 if self.with_state else None, do, dht if self.final_grad else None]
        return [t.to(device) if t is not None else None for t in out]


def cases(max_T, max_B=3, max_H=5):
    # T = 1, T not a power of two, any T up to max_T.
    T = st.one_of(st.just(1), st.sampled_from([3, 7, 13, 31, 63, 65, 100]).filter(lambda t: t <= max_T),
                  st.integers(1, max_T))
    return st.builds(
        Case, B=st.integers(1, max_B), T=T, H=st.integers(1, max_H),
        shift=st.one_of(st.sampled_from([-20.0, 0.0, 20.0]), st.floats(-20, 20)),
        lower_bound=st.sampled_from([0.0, 0.0, 0.5, 0.9, 0.999]), masked=st.sampled_from([0.0, 0.0, 0.3]),
        with_state=st.booleans(), final_grad=st.booleans(), seed=st.integers(0, 2**31 - 1))


HARD = [
    Case(B=1, T=1, H=1, shift=-20.0, with_state=True),
    Case(B=2, T=13, H=3, shift=20.0, lower_bound=0.999, masked=0.3, with_state=False, seed=1),
    Case(B=1, T=31, H=5, shift=-20.0, lower_bound=0.5, masked=0.3, final_grad=False, seed=2),
    Case(B=3, T=7, H=2, shift=0.0, lower_bound=0.9, with_state=True, seed=3),
]


def with_hard_cases(test):
    for c in HARD:
        test = example(c)(test)
    return test


def _run(fn, inputs, do, dht):
    """fn's outputs and the gradients of sum(o do) + sum(hT dht) for every tensor input (None for
    absent ones)."""
    leaves = [t.requires_grad_() if t is not None else None for t in inputs]
    o, hT = fn(*leaves)
    loss = (o.float() * do.float()).sum() + ((hT * dht.float()).sum() if dht is not None else 0)
    live = [t for t in leaves if t is not None]
    grads = dict(zip(map(id, live), torch.autograd.grad(loss, live)))
    return [o, hT] + [grads[id(t)] if t is not None else None for t in leaves]


def check_gated(case, dtype, device):
    y, x, lb, v, h0, do, dht = case.logits(device)
    # The reference sees the inputs the op sees, rounded to dtype (fp32 for the bound and states).
    y, x, v, do = (t.to(dtype).double() for t in (y, x, v, do))
    lb, h0 = (t.float().double() if t is not None else None for t in (lb, h0))
    dht_ref = dht.float().double() if dht is not None else torch.zeros(case.B, case.H, 1, 1, dtype=torch.float64,
                                                                        device=device)
    want, scales = gated_reference(y, x, lb, v, h0, do, dht_ref)
    inputs = [y.to(dtype), x.to(dtype), lb.float() if lb is not None else None, v.to(dtype),
              h0.float() if h0 is not None else None]
    got = _run(gated_chunk_hgrn2, inputs, do.to(dtype), dht.float() if dht is not None else None)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32 and got[1].shape == (case.B, case.H, 1, 1)
    # df_logits is measured relative to its weight w = (1 - lb) s (1 - s) / f (`gated_errors`), which
    # is 0 at masked steps: there the gradient is 0 exactly, measured as is.
    w = scales["df_logits"]
    scales["df_logits"] = torch.where(w == 0, 1.0, w)
    errs = gated_errors(got, want, scales, elementwise=dtype == torch.float32)
    bad = {k: e for k, e in errs.items() if not e <= tol(dtype, case.T)}
    assert not bad, f"relative errors over {tol(dtype, case.T)} for {dtype}: {bad} ({case})"


def check_plain(case, dtype, device):
    """chunk_hgrn2 (q and g = log f given) at K = V = 1 against the float64 step loop."""
    y, x, lb, v, h0, do, dht = case.logits(device)
    q = y.to(dtype).double()
    g = scan1.gate_values(y, x, lb, True, torch.float64)[1].log().float().double()
    v, do = v.to(dtype).double(), do.to(dtype).double()
    h0 = h0.float().double() if h0 is not None else None
    dht = dht.float().double() if dht is not None else torch.zeros(case.B, case.H, 1, 1, dtype=torch.float64,
                                                                    device=device)
    leaves = [t.clone().unsqueeze(-1).requires_grad_() for t in (q, g)] + [v.clone().requires_grad_()]
    h0r = h0.clone().requires_grad_() if h0 is not None else None
    o_r, hT_r = naive_recurrence(*leaves, h0r, 1.0)
    want = torch.autograd.grad((o_r * do).sum() + (hT_r * dht).sum(), leaves + ([h0r] if h0r is not None else []))
    inputs = [q.to(dtype).unsqueeze(-1), g.float().unsqueeze(-1), v.to(dtype), h0.float() if h0 is not None else None]
    got = _run(chunk_hgrn2, inputs, do.to(dtype), dht.float())
    errs = {"o": rel_err(got[0], o_r), "final_state": rel_err(got[1], hT_r)}
    errs.update({n: rel_err(a, b) for n, a, b in zip(["dq", "dg", "dv", "dh0"], got[2:], want)})
    bad = {k: e for k, e in errs.items() if not e <= tol(dtype, case.T)}
    assert not bad, f"relative errors over {tol(dtype, case.T)} for {dtype}: {bad} ({case})"


# ---- the kernels (under the interpreter without a GPU) -------------------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@settings(max_examples=min(settings().max_examples, 20))
@with_hard_cases
@given(cases(max_T=100))
def test_gated_scan_matches_float64(case):
    check_gated(case, torch.float32, DEVICE)


@settings(max_examples=min(settings().max_examples, 15))
@with_hard_cases
@given(cases(max_T=100))
def test_plain_scan_matches_float64(case):
    check_plain(case, torch.float32, DEVICE)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_half_precision(dtype):
    # The interpreter stores bf16 as raw 16-bit integers: bf16 only on the GPU.
    check_gated(Case(B=2, T=40, H=5, lower_bound=0.9, masked=0.2, seed=5), dtype, DEVICE)


def test_the_scan_runs_and_its_pytorch_form_agrees(monkeypatch):
    """The ops take the kernels on real tensors (counted), and `scan1`'s PyTorch form (the path of
    traced calls under the interpreter) gives the same outputs and gradients."""
    launches = []
    monkeypatch.setattr(scan1, "launcher", lambda k, _real=scan1.launcher: (launches.append(k), _real(k))[1])
    y, x, lb, v, h0, do, dht = (t.float() if t is not None else None for t in
                                Case(B=2, T=21, H=3, lower_bound=0.5, masked=0.2, seed=7).logits(DEVICE))
    kernels = _run(gated_chunk_hgrn2, [t.clone() for t in (y, x, lb, v, h0)], do, dht)
    assert launches == [scan1._fwd_kernel, scan1._bwd_kernel]
    monkeypatch.setattr(scan1, "_triton", lambda *tensors: False)
    torch_form = _run(gated_chunk_hgrn2, [t.clone() for t in (y, x, lb, v, h0)], do, dht)
    for a, b in zip(kernels, torch_form):
        assert rel_err(a, b) <= 1e-6


def test_masked_steps_leave_the_state_bit_for_bit():
    """f_logit = MASKED_F_LOGIT: f = 1 and 1 - f = 0 exactly, so the state passes unchanged, with a
    lower bound or without: the final state after a masked tail equals the unmasked prefix's."""
    y, x, lb, v, h0, _, _ = (t.float() if t is not None else None for t in
                             Case(B=2, T=30, H=4, lower_bound=0.9, seed=8).logits(DEVICE))
    for bound in (None, lb):
        x_tail = x.clone()
        x_tail[:, 17:] = MASKED_F_LOGIT
        _, h_prefix = gated_chunk_hgrn2(y[:, :17], x[:, :17], bound, v[:, :17], h0)
        o, h_full = gated_chunk_hgrn2(y, x_tail, bound, v, h0)
        assert torch.equal(h_full, h_prefix)
        assert torch.isfinite(o).all()


def test_tokens_and_padding_through_the_model_match_the_pytorch_path(monkeypatch):
    """HGRN2ForCausalLM at expand_ratio 1 (heads of K = V = 1), lower bounds, padding: loss and
    every gradient through the scan equal those through the chunked PyTorch path."""
    torch.manual_seed(0)
    cfg = HGRN2Config(vocab_size=61, hidden_size=24, num_hidden_layers=2, expand_ratio=1, intermediate_size=48)
    model = HGRN2ForCausalLM(cfg).to(DEVICE)
    with torch.no_grad():
        model.model.lower_bounds.normal_()
        for layer in model.model.layers:
            layer.attn.f_proj.weight.mul_(5)  # gates towards 0 and 1
    ids = torch.randint(0, cfg.vocab_size, (3, 19), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0  # padding: masked steps
    mask[1, 2:5] = 0

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    used = []
    monkeypatch.setattr(scan1, "forward", lambda *a, _f=scan1.forward, **k: (used.append(1), _f(*a, **k))[1])
    loss, grads = loss_and_grads()
    assert len(used) == cfg.num_hidden_layers
    monkeypatch.setattr(scan1, "takes", lambda x, v: False)  # the ops' chunked PyTorch path
    loss_ref, grads_ref = loss_and_grads()
    assert len(used) == cfg.num_hidden_layers
    assert rel_err(loss, loss_ref) <= 1e-6
    for name, g in grads.items():
        assert rel_err(g, grads_ref[name]) <= 1e-4, name


@pytest.mark.skipif(not INTERPRETING, reason="the traced path under the interpreter")
def test_opcheck_and_compile_under_the_interpreter():
    """Fake tensors and traced calls take the PyTorch form, real ones the kernels: the same outputs'
    shapes, dtypes and strides (opcheck), and under torch.compile the same outputs and gradients."""
    check_opcheck("cpu", torch.float32)
    y, x, lb, v, h0, do, dht = (t.float() for t in Case(B=2, T=12, H=3, lower_bound=0.5, masked=0.2,
                                                         seed=12).logits("cpu"))
    eager = _run(gated_chunk_hgrn2, [t.clone() for t in (y, x, lb, v, h0)], do, dht)
    compiled = _run(torch.compile(gated_chunk_hgrn2, backend="aot_eager", fullgraph=True),
                    [t.clone() for t in (y, x, lb, v, h0)], do, dht)
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) <= 1e-6


def check_opcheck(device, dtype):
    """opcheck of both ops and the gated backward at K = V = 1. Under the interpreter the forward
    ops skip test_aot_dispatch_dynamic: it compares their third output, the states' raw bits, bit
    for bit between the kernels (numpy's fp32 in the interpreter) and the traced PyTorch form."""
    y, x, lb, v, h0, do, dht = Case(B=2, T=10, H=3, lower_bound=0.5, masked=0.2, seed=9).logits(device)
    y, x, v, do = (t.to(dtype) for t in (y, x, v, do))
    lb, h0, dht = lb.float(), h0.float(), dht.float()
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") + (
        () if device == "cpu" else ("test_aot_dispatch_dynamic",))
    leaves = [t.clone().requires_grad_() for t in (y, x, lb, v, h0)]
    torch.library.opcheck(torch.ops.hgrn2mini.gated_chunk_hgrn2.default, (*leaves, 1.0), test_utils=utils)
    args = tuple(t.detach() for t in leaves) + (do, dht, 1.0)
    torch.library.opcheck(torch.ops.hgrn2mini.gated_chunk_hgrn2_bwd.default, args)
    q, g = y.unsqueeze(-1).clone().requires_grad_(), torch.nn.functional.logsigmoid(x.float()).unsqueeze(-1)
    torch.library.opcheck(torch.ops.hgrn2mini.chunk_hgrn2.default,
                          (q, g.requires_grad_(), v.clone().requires_grad_(), h0.clone().requires_grad_(), 1.0),
                          test_utils=utils)


# ---- on the GPU (`-m gpu`): bf16, larger shapes, long sequences, compile -----------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@settings(max_examples=min(settings().max_examples, 40))
@with_hard_cases
@example(Case(B=4, T=1000, H=515, shift=3.0, lower_bound=0.9, masked=0.1, seed=10))  # H past a block
@given(cases(max_T=1200, max_B=4, max_H=300))
def test_gated_scan_matches_float64_cuda(dtype, case):
    check_gated(case, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@with_hard_cases
@given(cases(max_T=600, max_B=4, max_H=200))
def test_plain_scan_matches_float64_cuda(dtype, case):
    check_plain(case, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_long_sequence_cuda(dtype):
    """16k steps of 512 channels, gates near 1 (long memory) and a lower bound: against the scan's
    PyTorch form in float64 (itself checked against the step loop above)."""
    case = Case(B=2, T=16384, H=512, shift=4.0, lower_bound=0.9, masked=0.05, seed=11)
    y, x, lb, v, h0, do, dht = case.logits("cuda")
    y, x, v, do = (t.to(dtype) for t in (y, x, v, do))
    got = _run(gated_chunk_hgrn2, [y, x, lb.float(), v, h0.float()], do, dht.float())
    want = _run(_float64_op, [t.double() for t in (y, x, lb.float(), v, h0.float())], do.double(), dht.double())
    for name, a, b in zip(["o", "hT", "dq_logits", "df_logits", "dlb", "dv", "dh0"], got, want):
        assert rel_err(a, b) <= tol(dtype, case.T), (name, rel_err(a, b))


def _float64_op(y, x, lb, v, h0):
    """The gated op in float64 by its PyTorch form, differentiable by autograd."""
    q, f, k = scan1.gate_values(y, x, lb, True, torch.float64)
    o, states = scan1.scan_ref(q, f, k, v[..., 0], h0[..., 0, 0], 1.0)
    return o[..., None], states[:, -1, :, None, None]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cuda(dtype):
    check_opcheck("cuda", dtype)


@pytest.mark.gpu
def test_compiled_model_matches_eager_cuda():
    """torch.compile at expand_ratio 1: the scan's kernels inside the compiled graph (triton_op),
    the same loss and gradients as eager (fp32: only the fusion of the ops around it differs)."""
    torch.manual_seed(0)
    cfg = HGRN2Config(vocab_size=97, hidden_size=256, num_hidden_layers=2, expand_ratio=1)
    model = HGRN2ForCausalLM(cfg).to("cuda")
    ids = torch.randint(0, cfg.vocab_size, (4, 300), device="cuda")

    def step(fn):
        model.zero_grad()
        loss = fn(ids, labels=ids).loss
        loss.backward()
        return loss.detach().float(), [p.grad.float().clone() for p in model.parameters()]

    loss, grads = step(model)
    loss_c, grads_c = step(torch.compile(model, fullgraph=True))
    assert rel_err(loss_c, loss) <= 1e-5
    for a, b in zip(grads_c, grads):
        assert rel_err(a, b) <= 1e-3

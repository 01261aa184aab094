"""The recurrence op `hgrn2mini::chunk_hgrn2` against the step-by-step float64 loop."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from naive import gated_errors, gated_reference, naive_recurrence, rel_err
from problems import Problem, problems, with_hard_cases

from hgrn2mini.ops import chunk_hgrn2, gated_chunk_hgrn2

# Relative error (norm of the difference over norm of the float64 reference) per input dtype.
# fp32: the cumulative gate is an fp32 sum, so exp(b_i - b_j) carries ~|b| * 2^-24 relative error
# (|b| up to 64 * 30 in a chunk); bf16: operands of every matmul are rounded to 8 bits.
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def reference(p, q, g, v, h0, do, dht):
    """Outputs and gradients of the naive loop in float64."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, g, v)]
    h0 = h0.detach().clone().requires_grad_() if h0 is not None else None
    o, hT = naive_recurrence(*leaves, h0)
    grads = torch.autograd.grad((o * do).sum() + (hT * dht).sum(), leaves + ([h0] if h0 is not None else []))
    return o, hT, grads


def run_op(dtype, q, g, v, h0, do, dht):
    leaves = [q.to(dtype).requires_grad_(), g.float().requires_grad_(), v.to(dtype).requires_grad_()]
    h0 = h0.float().requires_grad_() if h0 is not None else None
    o, hT = chunk_hgrn2(*leaves, h0)
    loss = (o.float() * do.float()).sum() + (hT * dht.float()).sum()
    grads = torch.autograd.grad(loss, leaves + ([h0] if h0 is not None else []))
    return o, hT, grads


def check_against_naive(p, dtype, device):
    q, g, v, h0, do, dht = p.inputs(device)
    # The reference sees the inputs the op sees: q, v (and do, through autograd) in `dtype`, g and
    # the states in fp32. Rounding the inputs is not the op's error; everything after is.
    q, v, do = (x.to(dtype).double() for x in (q, v, do))
    g, dht = g.float().double(), dht.float().double()
    h0 = h0.float().double() if h0 is not None else None
    o_ref, hT_ref, g_ref = reference(p, q, g, v, h0, do, dht)
    o, hT, grads = run_op(dtype, q, g, v, h0, do, dht)
    tol = TOL[dtype]
    errs = {"o": rel_err(o, o_ref), "final_state": rel_err(hT, hT_ref)}
    for name, got, want in zip(["dq", "dg", "dv", "dh0"], grads, g_ref):
        errs[name] = rel_err(got, want)
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors over {tol} for {dtype}: {bad} ({p})"


def gated_op_and_reference(p, dtype, device):
    """The gated op's 7 outputs (GATED_NAMES) on problem p with inputs in dtype, and the float64
    loop's on the same rounded inputs, with its scales (`gated_reference`)."""
    y, x, lb, v, h0, do, dht = p.logits(device)
    y, x, v, do = (t.to(dtype).double() for t in (y, x, v, do))
    lb = lb.float().double() if lb is not None else None
    h0 = h0.float().double() if h0 is not None else None
    want, scales = gated_reference(y, x, lb, v, h0, do, dht.float().double())
    leaves = [y.to(dtype), x.to(dtype), lb.float() if lb is not None else None, v.to(dtype),
              h0.float() if h0 is not None else None]
    leaves = [t.requires_grad_() if t is not None else None for t in leaves]
    o, hT = gated_chunk_hgrn2(*leaves)
    loss = (o.float() * do.float()).sum() + (hT * dht.float()).sum()
    live = [t for t in leaves if t is not None]
    grads = dict(zip([id(t) for t in live], torch.autograd.grad(loss, live)))
    return [o, hT] + [grads[id(t)] if t is not None else None for t in leaves], want, scales


def check_gated_against_float64(p, dtype, device):
    """The gated op (gates from their logits inside: on CUDA computed by the kernels as they load
    them) against the float64 loop, with the same tolerance per dtype as the plain op."""
    got, want, scales = gated_op_and_reference(p, dtype, device)
    errs = gated_errors(got, want, scales, elementwise=dtype == torch.float32)
    bad = {k: e for k, e in errs.items() if not e <= TOL[dtype]}
    assert not bad, f"relative errors over {TOL[dtype]} for {dtype}: {bad} ({p})"


@settings(max_examples=15)
@with_hard_cases
@given(problems(max_T=100))
def test_gated_op_matches_float64_cpu(p):
    check_gated_against_float64(p, torch.float32, "cpu")


@with_hard_cases
@given(problems())
def test_op_matches_naive_loop_cpu(p):
    check_against_naive(p, torch.float32, "cpu")


@settings(max_examples=10)
@with_hard_cases
@given(problems(max_T=100))
def test_op_bf16_cpu(p):
    check_against_naive(p, torch.bfloat16, "cpu")


@given(problems(max_T=200), st.data())
def test_split_sequence_equals_whole(p, data):
    """Running [0, s) then [s, T) with the state passed gives the whole sequence's result."""
    q, g, v, h0, _, _ = (x.float() if x is not None else None for x in p.inputs())
    s = data.draw(st.integers(0, p.T), label="split")
    o, hT = chunk_hgrn2(q, g, v, h0)
    o1, h1 = chunk_hgrn2(q[:, :s], g[:, :s], v[:, :s], h0)
    o2, h2 = chunk_hgrn2(q[:, s:], g[:, s:], v[:, s:], h1)
    assert rel_err(torch.cat([o1, o2], 1), o) <= 1e-5
    assert rel_err(h2, hT) <= 1e-5


_SMALL = dict(B=2, T=70, H=2, K=16, V=32)


def _opcheck_args(device, dtype, with_state):
    """Leaves q, v (dtype), g and h0 (fp32) of a small problem with moderate gates."""
    q, g, v, h0, _, _ = Problem(**_SMALL, with_state=with_state, seed=0).inputs(device)
    return (q.to(dtype).requires_grad_(), g.float().requires_grad_(), v.to(dtype).requires_grad_(),
            h0.float().requires_grad_() if h0 is not None else None)


def opcheck_both(device, dtype, with_state):
    q, g, v, h0 = _opcheck_args(device, dtype, with_state)
    torch.library.opcheck(torch.ops.hgrn2mini.chunk_hgrn2.default, (q, g, v, h0, 0.25))
    # The gated op: logits [B, T, H*K] and a lower bound instead of q and g.
    q_logits, f_logits, lb, _, _, do, dht = Problem(**_SMALL, lower_bound=0.5, seed=1).logits(device)
    do, dht = do.to(dtype), dht.float()
    args = tuple(x.detach() if x is not None else None for x in (q, g, v, h0)) + (do, dht, 0.25)
    torch.library.opcheck(torch.ops.hgrn2mini.chunk_hgrn2_bwd.default, args)
    q_logits, f_logits = (t.to(dtype).requires_grad_() for t in (q_logits, f_logits))
    lb = lb.float().requires_grad_()
    torch.library.opcheck(torch.ops.hgrn2mini.gated_chunk_hgrn2.default, (q_logits, f_logits, lb, v, h0, 0.25))
    args = tuple(x.detach() if x is not None else None for x in (q_logits, f_logits, lb, v, h0)) + (do, dht, 0.25)
    torch.library.opcheck(torch.ops.hgrn2mini.gated_chunk_hgrn2_bwd.default, args)


def test_opcheck_cpu():
    # One case: opcheck compiles the op several ways, about a minute on two cores. The GPU run
    # covers with and without a state, fp32 and bf16.
    opcheck_both("cpu", torch.float32, True)


def test_gradient_of_sum_with_stride_zero():
    """`.sum()` sends a stride-0 gradient; the op must treat it as dense."""
    q, g, v, h0 = _opcheck_args("cpu", torch.float32, True)
    o, hT = chunk_hgrn2(q, g, v, h0)
    (o.sum() + hT.sum()).backward()
    ref = [x.detach().double().requires_grad_() for x in (q, g, v, h0)]
    o_r, hT_r = naive_recurrence(*ref)
    (o_r.sum() + hT_r.sum()).backward()
    for x, r in zip((q, g, v, h0), ref):
        assert rel_err(x.grad, r.grad) <= TOL[torch.float32]


def test_gradient_of_the_final_state_alone():
    """o unused: autograd hands the backward no gradient for it (not a tensor of zeros)."""
    q, g, v, h0 = _opcheck_args("cpu", torch.float32, True)
    _, hT = chunk_hgrn2(q, g, v, h0)
    hT.square().sum().backward()
    ref = [x.detach().double().requires_grad_() for x in (q, g, v, h0)]
    _, hT_r = naive_recurrence(*ref)
    hT_r.square().sum().backward()
    assert q.grad is None or not q.grad.any()  # the final state does not depend on q
    for x, r in zip((g, v, h0), ref[1:]):
        assert rel_err(x.grad, r.grad) <= TOL[torch.float32]


def test_double_backward_is_a_clear_error():
    q, g, v, _ = _opcheck_args("cpu", torch.float32, False)
    o, _ = chunk_hgrn2(q, g, v)
    (dq,) = torch.autograd.grad(o.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="chunk_hgrn2_bwd"):
        dq.sum().backward()


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(q=torch.randn(2, 5, 2)), r"q must be \[B, T, H, D\]"),
        (dict(g=torch.randn(2, 5, 2, 8, dtype=torch.float64)), "g .* must be float32"),
        (dict(g=torch.randn(2, 6, 2, 8)), "g must have q's shape"),
        (dict(v=torch.randn(2, 5, 3, 4)), "v must be"),
        (dict(v=torch.randn(2, 5, 2, 4, dtype=torch.bfloat16)), "v must have q's dtype"),
        (dict(q=torch.randint(0, 3, (2, 5, 2, 8))), "q must be float32, bfloat16 or float16"),
        (dict(initial_state=torch.randn(2, 2, 8, 5)), r"initial_state must be \[B, H, K, V\]"),
        (dict(initial_state=torch.randn(2, 2, 8, 4, dtype=torch.bfloat16)), "initial_state must be float32"),
        (dict(initial_state=torch.randn(2, 2, 8, 4, device="meta")), "initial_state must be on cpu"),
    ],
)
def test_bad_input_names_the_argument(change, match):
    args = dict(q=torch.randn(2, 5, 2, 8), g=-torch.rand(2, 5, 2, 8), v=torch.randn(2, 5, 2, 4), initial_state=None)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        chunk_hgrn2(**args)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(q_logits=torch.randn(2, 5, 2, 8)), r"q_logits must be \[B, T, H\*K\]"),
        (dict(f_logits=torch.randn(2, 5, 15)), r"f_logits must be \[B, T, H\*K\]"),
        (dict(f_logits=torch.randn(2, 5, 8)), "f_logits must have q_logits' shape"),
        (dict(q_logits=torch.randn(2, 5, 16, dtype=torch.bfloat16)), "q_logits must have v's dtype"),
        (dict(lower_bound=torch.rand(15)), r"lower_bound must be float32 \[16\]"),
        (dict(lower_bound=torch.rand(16, dtype=torch.float64)), "lower_bound must be float32"),
        (dict(lower_bound=torch.rand(16, device="meta")), "lower_bound must be on v's device"),
        (dict(v=torch.randn(2, 5, 2, 4).int()), "v must be float32, bfloat16 or float16"),
        (dict(initial_state=torch.randn(2, 2, 8, 5)), r"initial_state must be \[B, H, K, V\]"),
    ],
)
def test_gated_bad_input_names_the_argument(change, match):
    args = dict(q_logits=torch.randn(2, 5, 16), f_logits=torch.randn(2, 5, 16), lower_bound=torch.rand(16),
                v=torch.randn(2, 5, 2, 4), initial_state=None)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        gated_chunk_hgrn2(**args)


# ---- on the GPU: the Triton path (selected with `-m gpu` on the device machine) ------------------


def with_k64_cases(test):
    """K = V = 64 (bf16 there has launch settings of its own, kernels/settings.py FAST): segments
    (10 chunks into 2, joined in the out kernel) with every chunk decaying past the whole-chunk path
    (redone), and moderate gates with a state."""
    test = example(Problem(B=2, T=600, H=2, K=64, V=64, gate="uniform30", shift=0.0, lower_bound=0.0,
                           with_state=True, seed=11))(test)
    return example(Problem(B=2, T=300, H=2, K=64, V=64, gate="logits", shift=0.0, lower_bound=0.0,
                           with_state=True, seed=12))(test)


@pytest.mark.gpu
@with_hard_cases
@with_k64_cases
@given(problems(max_T=600, dims=(16, 32, 64, 128), max_B=2, max_H=2))
def test_op_matches_naive_loop_cuda_fp32(p):
    check_against_naive(p, torch.float32, "cuda")


@pytest.mark.gpu
@with_hard_cases
@with_k64_cases
@given(problems(max_T=600, dims=(16, 32, 64, 128), max_B=2, max_H=2))
def test_op_matches_naive_loop_cuda_bf16(p):
    check_against_naive(p, torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@with_hard_cases
# Drawn on the GPU: d f_logits 1.05e-2 and 1.62e-2 by the plain norm, one element of
# dg at 3.9% where the derivative's weight is largest (see `gated_errors`).
@example(Problem(B=1, T=32, H=1, K=16, V=16, gate="logits", shift=-20.0, lower_bound=0.5, with_state=True, seed=1))
@example(Problem(B=1, T=32, H=1, K=16, V=16, gate="logits", shift=-20.0, lower_bound=0.5, with_state=False, seed=7))
@given(problems(max_T=600, dims=(16, 32, 64, 128), max_B=2, max_H=2))
def test_gated_op_matches_float64_cuda(dtype, p):
    check_gated_against_float64(p, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_state", [False, True])
def test_opcheck_cuda(dtype, with_state):
    opcheck_both("cuda", dtype, with_state)


@pytest.mark.gpu
@pytest.mark.parametrize("K, V", [(128, 128), (64, 256), (256, 16), (64, 64)])
def test_long_sequence_strong_decay_cuda(K, V):
    """32k tokens with gates down to exp(-30) per step: finite, and equal to the float64 chunked
    reference (itself checked against the loop above)."""
    from hgrn2mini.kernels.chunk import chunk_hgrn2_bwd_ref, chunk_hgrn2_fwd_ref

    torch.manual_seed(0)
    B, T, H = 1, 32768, 1
    q = torch.randn(B, T, H, K, device="cuda")
    g = torch.where(torch.rand(B, T, H, K, device="cuda") < 0.5, -30 * torch.rand(B, T, H, K, device="cuda"),
                    torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device="cuda") + 4))
    v = torch.randn(B, T, H, V, device="cuda")
    do = torch.randn_like(v)
    o_ref, hT_ref = chunk_hgrn2_fwd_ref(q.double(), g.double(), v.double(), None, K**-0.5)
    grads_ref = chunk_hgrn2_bwd_ref(q.double(), g.double(), v.double(), None, do.double(), None, K**-0.5)
    for dtype in (torch.float32, torch.bfloat16):
        # fresh leaves per dtype (q.to(float32) would be q itself, and then not a leaf the second time)
        leaves = [x.detach().to(dtype).clone().requires_grad_() for x in (q, g, v)]
        leaves[1] = g.detach().clone().requires_grad_()
        o, hT = chunk_hgrn2(*leaves)
        o.backward(do.to(dtype))
        for name, got, want in [("o", o, o_ref), ("hT", hT, hT_ref)] + list(
            zip(["dq", "dg", "dv"], [x.grad for x in leaves], grads_ref[:3])
        ):
            assert rel_err(got, want) <= TOL[dtype], (dtype, name, rel_err(got, want))


@pytest.mark.gpu
def test_compile_and_export_keep_the_op_cuda():
    q, g, v, h0 = _opcheck_args("cuda", torch.bfloat16, True)

    def f(q, g, v, h0):
        o, hT = chunk_hgrn2(q, g, v, h0)
        return o.float().square().sum() + hT.sum()

    eager = torch.autograd.grad(f(q, g, v, h0), (q, g, v, h0))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, g, v, h0), (q, g, v, h0))
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) <= 1e-3

    class M(torch.nn.Module):
        def forward(self, q, g, v, h0):
            return chunk_hgrn2(q, g, v, h0)

    ep = torch.export.export(M(), (q.detach(), g.detach(), v.detach(), h0.detach()))
    assert "hgrn2mini.chunk_hgrn2" in str(ep.graph)
    assert rel_err(ep.module()(q, g, v, h0)[0], M()(q, g, v, h0)[0]) == 0


def test_eager_calls_run_the_bodies_with_raw_launches(monkeypatch):
    """Eager calls go through `_Direct`, which runs the op bodies as a triton_op runs them: with
    `wrap_triton` launching straight to Triton (outside a triton_op each launch would be dispatched
    as a higher-order op, several times the kernels' GPU time)."""
    from torch._library.triton import is_wrap_triton_enabled

    from hgrn2mini import ops

    seen = []
    for name in ("_forward", "_backward_body"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name: (seen.append(
            (_name, is_wrap_triton_enabled())), _real(*a))[1])
    q, g, v, h0 = _opcheck_args("cpu", torch.float32, True)
    o, hT = chunk_hgrn2(q, g, v, h0)
    (o.sum() + hT.sum()).backward()
    assert seen == [("_forward", False), ("_backward_body", False)]
    assert is_wrap_triton_enabled()  # restored after the call


class _FakeCompiled:
    """Stands for Triton's CompiledKernel: records the launcher calls."""

    function, packed_metadata = "fn", "meta"

    def __init__(self, calls):
        self.calls = calls

    def run(self, *a):
        self.calls.append(("compiled", a))


class _FakeKernel:
    """Stands for a JITFunction of signature (x, n, BLOCK): `kernel[grid](...)` is Triton's own launch."""

    arg_names = ["x", "n", "BLOCK"]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("triton", grid, args, tuple(sorted(kwargs.items(), key=lambda kv: kv[0]))))
            return _FakeCompiled(self.calls)
        return run


def test_direct_launch_reuses_a_compiled_kernel_only_for_its_specialization(monkeypatch):
    """`launch._Launch`: a launch goes through Triton the first time for each specialization (dtype
    and 16-byte alignment of each tensor, each int's value, constexprs, options, device) and through
    the compiled kernel's launcher after, with every argument in the kernel's signature order."""
    from hgrn2mini.kernels import launch

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(launch, "_raw_stream", lambda device: 1234)
    monkeypatch.setattr(launch, "_hooked", lambda: False)
    k = _FakeKernel()
    L = launch._Launch(k)
    buf = torch.zeros(64, dtype=torch.float32)
    x, misaligned = buf[:16], buf[1:17]
    kinds = lambda: [c[0] for c in k.calls]

    L[(4,)](x, 7, BLOCK=32, num_warps=4)
    L[(4,)](x, 7, BLOCK=32, num_warps=4)
    assert kinds() == ["triton", "compiled"]
    # tensors reach the compiled launcher as their addresses
    assert k.calls[1][1] == (4, 1, 1, 1234, "fn", "meta", None, None, None, x.data_ptr(), 7, 32)
    L[(2, 3)](x, BLOCK=32, n=7, num_warps=4)  # keywords in another order, another grid: the same kernel
    assert kinds()[-1] == "compiled" and k.calls[-1][1][:3] == (2, 3, 1) and k.calls[-1][1][-3:] == (x.data_ptr(), 7, 32)
    for args, kwargs in [((x, 8), dict(BLOCK=32, num_warps=4)),          # another int
                         ((x.double(), 7), dict(BLOCK=32, num_warps=4)),  # another dtype
                         ((misaligned, 7), dict(BLOCK=32, num_warps=4)),  # not 16-byte aligned
                         ((x, 7), dict(BLOCK=64, num_warps=4)),           # another constexpr
                         ((x, 7), dict(BLOCK=32, num_warps=8))]:          # another option
        n = len(k.calls)
        L[(4,)](*args, **kwargs)
        L[(4,)](*args, **kwargs)
        assert kinds()[n:] == ["triton", "compiled"], (args, kwargs)
    n = len(k.calls)
    L[(4,)](x, 7)  # BLOCK left to a default: Triton's binder decides, every time
    L[(4,)](x, 7)
    assert kinds()[n:] == ["triton", "triton"]
    monkeypatch.setattr(launch, "_hooked", lambda: True)  # a profiler's launch hook: through Triton
    n = len(k.calls)
    L[(4,)](x, 7, BLOCK=32, num_warps=4)
    assert kinds()[n:] == ["triton"]


def test_direct_launch_refused_falls_back_to_triton(monkeypatch):
    """A Triton whose compiled launcher takes other arguments (TypeError before launching): the
    launch goes through Triton and direct launches are switched off, with a warning."""
    from hgrn2mini.kernels import launch
    from hgrn2mini.kernels.settings import CONFIG

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(launch, "_raw_stream", lambda device: 1234)
    monkeypatch.setattr(launch, "_hooked", lambda: False)
    monkeypatch.setitem(CONFIG, "direct_launch", True)
    k = _FakeKernel()

    def refuse(self, *a):
        raise TypeError("function takes exactly 12 arguments")
    monkeypatch.setattr(_FakeCompiled, "run", refuse)
    L, x = launch._Launch(k), torch.zeros(16)
    L[(4,)](x, 7, BLOCK=32)
    with pytest.warns(RuntimeWarning, match="launching through Triton from now on"):
        L[(4,)](x, 7, BLOCK=32)
    assert [c[0] for c in k.calls] == ["triton", "triton"] and CONFIG["direct_launch"] is False


@pytest.mark.gpu
def test_direct_launch_equals_tritons_own_cuda(monkeypatch):
    """The op's eager forward and backward through the compiled launchers (`launch._Launch`) give
    bit for bit what Triton's own launches give, at a length that is not a multiple of the chunk."""
    from hgrn2mini.kernels import launch
    from hgrn2mini.kernels.settings import CONFIG

    torch.manual_seed(0)
    B, T, H, K = 2, 200, 3, 64
    y, x = (torch.randn(B, T, H * K, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    lb = torch.rand(H * K, device="cuda")

    def run():
        o, hT = gated_chunk_hgrn2(y, x, lb, v)
        return (o, hT, *torch.autograd.grad(o.float().square().sum() + hT.sum(), (y, x, v)))

    monkeypatch.setitem(CONFIG, "direct_launch", False)
    want = run()
    monkeypatch.setitem(CONFIG, "direct_launch", True)
    launch._LAUNCHES.clear()
    first, second = run(), run()  # the first through Triton, the second through the launchers
    assert launch._LAUNCHES and all(L.compiled for L in launch._LAUNCHES.values())
    for a, b, c in zip(want, first, second):
        assert torch.equal(a, b) and torch.equal(a, c)

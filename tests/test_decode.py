"""The fused decode step: each Triton kernel of kernels/decode.py against float64, gates near 0
and 1 and the live mask included; the fused block against the model's PyTorch block; greedy
generation through both. On the CPU the kernels run in Triton's interpreter (fp32, tiny shapes);
the gpu-marked tests repeat them in bf16 at the 374M model's shapes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hgrn2mini.kernels import decode as kd
from hgrn2mini.kernels import decode_launch as kl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from naive import rel_err
from test_generate import agree_until_a_near_tie

from hgrn2mini import HGRN2Config, HGRN2ForCausalLM, decode, generation
from hgrn2mini.model import MASKED_F_LOGIT

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
needs_kernels = pytest.mark.skipif(not KERNELS, reason="the kernels run on CUDA or under TRITON_INTERPRET=1")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks small enough that the tiny shapes take several programs and K steps (masks at the
    edges), few enough programs that the interpreter stays quick."""
    set_matvec_launch(monkeypatch, lambda r: dict(BLOCK_N=16 if r == "dot" else 32, BLOCK_K=32))


def set_matvec_launch(monkeypatch, updates):
    """The matvec kernels' LAUNCH entries with updates(regime) applied, restored after the test."""
    for k in ("qfi", "o", "glu", "down"):
        monkeypatch.setitem(kd.LAUNCH, k, {r: {**s, **updates(r)} for r, s in kd.LAUNCH[k].items()})


def f64_norm(x, w, eps):
    x = x.double()
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y if w is None else y * w.double()


def f64_recurrent(qfi, lb, live, state, scale):
    """The step in float64 from the logits: g = log(lb + (1 - lb) sigmoid(f)), k = 1 - f."""
    q_logits, f_logits, v = (t.double() for t in qfi)
    B, H, K, V = state.shape
    f_logits = torch.where(live[:, None], f_logits, torch.full_like(f_logits, MASKED_F_LOGIT))
    g = F.logsigmoid(f_logits)
    if lb is not None:
        lb = lb.double().expand_as(g)
        g = torch.logaddexp(lb.log(), torch.log1p(-lb) + g)
    g = g.view(B, H, K)
    new = g.exp()[..., None] * state.double() - torch.expm1(g)[..., None] * v.view(B, H, 1, V)
    o = torch.einsum("bhk,bhkv->bhv", F.silu(q_logits).view(B, H, K) * scale, new)
    return o.reshape(B, H * V), new


def randn(*shape, gen, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


# ----------------------------------------------------------------------------------------------
# Each kernel against float64
# ----------------------------------------------------------------------------------------------


def check_matvecs(B, D, N, with_weight, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = randn(B, D, gen=gen, scale=3, dtype=dtype)
    nw = (1 + randn(D, gen=gen, scale=0.3)).to(dtype) if with_weight else None
    ws = [randn(N, D, gen=gen, scale=D**-0.5, dtype=dtype) for _ in range(3)]
    tol = TOL[dtype]
    xn = f64_norm(x, nw, 1e-6)
    out = torch.full((3, B, N), float("nan"), device=DEVICE, dtype=dtype)
    kd.norm_matvec(x, nw, 1e-6, ws, out)
    assert rel_err(out, torch.stack([xn @ w.double().T for w in ws])) < tol
    # x += norm(o) W^T with W [D, N]: the kernel of g_norm and o_proj (fp32 norm weight)
    o, wo = randn(B, N, gen=gen, dtype=dtype), randn(D, N, gen=gen, scale=N**-0.5, dtype=dtype)
    gw = 1 + randn(N, gen=gen, scale=0.3) if with_weight else None
    res = randn(B, D, gen=gen, dtype=dtype)
    want = res.double() + f64_norm(o, gw, 1e-5) @ wo.double().T
    assert rel_err(kd.norm_matvec_add(o, gw, 1e-5, wo, res), want) < tol
    # the MLP: h = silu(norm(x) Wg^T) * norm(x) Wu^T, then x += h Wd^T
    wg, wu = (randn(N, D, gen=gen, scale=D**-0.5, dtype=dtype) for _ in range(2))
    h = torch.full((B, N), float("nan"), device=DEVICE, dtype=dtype)
    kd.norm_glu(x, nw, 1e-6, wg, wu, h)
    assert rel_err(h, F.silu(xn @ wg.double().T) * (xn @ wu.double().T)) < tol
    wd = randn(D, N, gen=gen, scale=N**-0.5, dtype=dtype)
    res = randn(B, D, gen=gen, dtype=dtype)
    want = res.double() + h.double() @ wd.double().T
    assert rel_err(kd.matvec_add(h, wd, res), want) < tol


@needs_kernels
@given(B=st.sampled_from([1, 3, 17]), D=st.sampled_from([64, 48]), N=st.sampled_from([64, 96, 40]),
       with_weight=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_matvec_kernels_match_float64(B, D, N, with_weight, seed, small_blocks):
    check_matvecs(B, D, N, with_weight, seed, torch.float32)


def check_repeats(B, D, N, seed, dtype):
    """Each matvec kernel twice on the same inputs (GLU, residual, norm with and without weight):
    the same bits, and every split-K counter back at zero."""
    gen = torch.Generator().manual_seed(seed)
    x, o, h = randn(B, D, gen=gen, dtype=dtype), randn(B, N, gen=gen, dtype=dtype), randn(B, N, gen=gen, dtype=dtype)
    ws = [randn(N, D, gen=gen, scale=D**-0.5, dtype=dtype) for _ in range(3)]
    wo = randn(D, N, gen=gen, scale=N**-0.5, dtype=dtype)
    nw, res = 1 + randn(D, gen=gen, scale=0.3, dtype=dtype), randn(B, D, gen=gen, dtype=dtype)
    calls = [lambda: kd.norm_matvec(x, nw, 1e-6, ws, torch.empty(3, B, N, device=DEVICE, dtype=dtype)),
             lambda: kd.norm_matvec_add(o, None, 1e-5, wo, res.clone()),
             lambda: kd.norm_glu(x, nw, 1e-6, ws[0], ws[1], torch.empty(B, N, device=DEVICE, dtype=dtype)),
             lambda: kd.matvec_add(h, wo, res.clone())]
    for call in calls:
        assert torch.equal(call(), call())
    assert not kl._SCRATCH[x.device][1].any()  # the counters (the launches made the scratch)


@needs_kernels
@pytest.mark.parametrize("B, split, with_weight", [(1, 2, True), (1, 3, False), (1, 4, True), (17, 2, False),
                                                   (17, 3, True), (17, 4, False)])
def test_split_k_matches_float64_and_repeats_its_bits(B, split, with_weight, monkeypatch):
    """SPLIT_K programs a tile, the last to finish summing their partials: inputs of 72 (five
    16-wide K slices, the last partial) and 40 (three, so split 4 is capped at 3), split unevenly,
    at batch 1 and in the tl.dot regime (two row blocks for q/f/i). Two calls give the same bits
    and leave the counters zero."""
    set_matvec_launch(monkeypatch, lambda r: dict(BLOCK_N=32, BLOCK_K=16, SPLIT_K=split))
    monkeypatch.setattr(kl, "_SCRATCH", {})  # made by the first split launch, its counters zero
    check_matvecs(B, 72, 40, with_weight, split, torch.float32)
    check_repeats(B, 72, 40, split, torch.float32)


def test_split_k_scratch_grows_eagerly_and_never_under_capture(monkeypatch):
    monkeypatch.setattr(kl, "_SCRATCH", {})
    monkeypatch.setattr(kl, "_REPLACED", [])
    cpu = torch.device("cpu")
    first = kl.split_scratch(cpu, 100, 4)
    assert kl.split_scratch(cpu, 50, 2) is first and not first[1].any()
    grown = kl.split_scratch(cpu, 300, 4)
    assert grown[0].numel() >= 300 and grown[1].numel() >= 8 and not grown[1].any()
    assert kl._REPLACED == [first]  # graphs captured with it still point at it
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="run the same call \\(the decode step\\) once eagerly before capturing"):
        kl.split_scratch(torch.device("cuda", 0), 100, 4)


def check_recurrent(B, H, K, lb_kind, f_scale, live_p, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    D = H * K
    qfi = randn(3, B, D, gen=gen, dtype=dtype)
    # forget logits spread to f_scale: f = sigmoid(+-30) is 1 or 0 to fp32 precision
    qfi[1] = randn(B, D, gen=gen, scale=f_scale, dtype=dtype)
    lb = {"none": None, "zero": torch.zeros(D), "mid": torch.rand(D, generator=gen) * 0.9,
          "near1": 1 - torch.rand(D, generator=gen) * 1e-3}[lb_kind]
    lb = lb.to(DEVICE) if lb is not None else None
    live = (torch.rand(B, generator=gen) < live_p).to(DEVICE)
    state = randn(B, H, K, K, gen=gen)
    before = state.clone()
    o = torch.full((B, D), float("nan"), device=DEVICE, dtype=dtype)
    o_want, s_want = f64_recurrent(qfi, lb, live, before, K**-0.5)
    kd.recurrent_step(qfi, lb, live, state, o, K**-0.5)
    tol = TOL[dtype]
    assert rel_err(state, s_want) < tol and rel_err(o, o_want) < tol
    # a row not live keeps its state bit for bit
    assert torch.equal(state[~live], before[~live])


@needs_kernels
@given(B=st.sampled_from([1, 3, 17]), H=st.sampled_from([1, 4]), K=st.sampled_from([8, 16]),
       lb_kind=st.sampled_from(["none", "zero", "mid", "near1"]), f_scale=st.sampled_from([1.0, 30.0]),
       live_p=st.sampled_from([1.0, 0.5, 0.0]), seed=st.integers(0, 2**16))
@settings(max_examples=10, deadline=None)
def test_recurrent_step_kernel_matches_float64(B, H, K, lb_kind, f_scale, live_p, seed):
    check_recurrent(B, H, K, lb_kind, f_scale, live_p, seed, torch.float32)


@needs_kernels
def test_a_row_not_live_keeps_its_state_bit_for_bit():
    """Even a state holding -0.0, huge values and NaN, and logits that would move it most."""
    B, H, K = 3, 2, 16
    qfi = torch.zeros(3, B, H * K, device=DEVICE)
    qfi[1] = -30.0  # f near 0: a live row's state would be replaced by i
    qfi[2] = 5.0
    state = torch.randn(B, H, K, K, device=DEVICE) * 1e30
    state[1, 0, 0, :3] = torch.tensor([-0.0, float("nan"), float("inf")])
    before = state.clone()
    live = torch.tensor([True, False, False], device=DEVICE)
    kd.recurrent_step(qfi, torch.full((H * K,), 0.5, device=DEVICE), live, state, torch.empty(B, H * K, device=DEVICE),
                      K**-0.5)
    assert torch.equal(state[1:].view(torch.int32), before[1:].view(torch.int32))
    assert not torch.equal(state[0], before[0])


def test_masked_logit_is_the_model_s():
    assert kd.MASKED_F_LOGIT == MASKED_F_LOGIT


def test_off_the_interpreter_the_wrappers_compute_the_references(monkeypatch):
    monkeypatch.setattr(kd, "_INTERPRETING", False)
    gen = torch.Generator().manual_seed(0)
    x, nw, w = torch.randn(2, 32, generator=gen), torch.rand(32, generator=gen), torch.randn(32, 32, generator=gen)
    out = torch.empty(1, 2, 32)
    assert torch.equal(kd.norm_matvec(x, nw, 1e-6, [w], out), kd.norm_matvec_ref(x, nw, 1e-6, [w]))
    res = torch.randn(2, 32, generator=gen)
    assert torch.equal(kd.matvec_add(x, w, res.clone()), kd.matvec_add_ref(x, w, res))


def test_bad_kernel_arguments_get_errors_that_name_them():
    x, w = torch.randn(2, 32), torch.randn(16, 32)
    for call, match in [
        (lambda: kd.norm_matvec(x[:, :8].T, None, 1e-6, [w], torch.empty(1, 2, 16)), "x must be a contiguous"),
        (lambda: kd.norm_matvec(x, None, 1e-6, [w, torch.randn(8, 32)], torch.empty(2, 2, 16)), r"weights\[1\]"),
        (lambda: kd.norm_matvec(x, None, 1e-6, [], torch.empty(0, 2, 16)), "weights must hold 1 to 3"),
        (lambda: kd.norm_matvec(x, torch.ones(31), 1e-6, [w], torch.empty(1, 2, 16)), "norm_weight"),
        (lambda: kd.norm_matvec(x, None, 1e-6, [w], torch.empty(1, 2, 15)), "out must be"),
        (lambda: kd.matvec_add(x, w.double(), torch.empty(2, 16)), "weight must be torch.float32"),
        (lambda: kd.norm_glu(x, None, 1e-6, w, w[:8], torch.empty(2, 16)), "up must be"),
        (lambda: kd.recurrent_step(torch.empty(3, 2, 32), None, torch.ones(2, dtype=torch.bool),
                                   torch.empty(2, 2, 12, 16), torch.empty(2, 32), 1.0), "state must have K"),
        (lambda: kd.recurrent_step(torch.empty(3, 2, 32), None, torch.ones(2), torch.empty(2, 2, 16, 16),
                                   torch.empty(2, 32), 1.0), "live must be a bool"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


# ----------------------------------------------------------------------------------------------
# The fused block against the model's, and generation through it
# ----------------------------------------------------------------------------------------------


def tiny(seed=0, layers=2, **overrides):
    """D = 64, H = 4 heads of K = V = 16, I = 96; random lower bounds and g_norm weights; decisive
    logits (initializer_range 0.2)."""
    cfg = dict(vocab_size=97, hidden_size=64, num_hidden_layers=layers, expand_ratio=16, intermediate_size=96,
               initializer_range=0.2)
    torch.manual_seed(seed)
    model = HGRN2ForCausalLM(HGRN2Config(**{**cfg, **overrides})).eval()
    with torch.no_grad():
        model.model.lower_bounds.normal_(0.0, 1.0)
        for layer in model.model.layers:
            layer.attn_norm.weight.uniform_(0.5, 1.5)
            if layer.attn.g_norm.weight is not None:
                layer.attn.g_norm.weight.uniform_(0.5, 1.5)
    return model


def one_step(model, B, fused, seed=0):
    """(hidden states before the head [B, D], state before, state after) of one decode step from
    random buffers: a random state, tokens, lower bounds, row 1 not live."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    b = decode._Buffers(model, B, device)
    b.state.copy_(torch.randn(b.state.shape, generator=gen))
    b.tok.copy_(torch.randint(0, model.config.vocab_size, (B,), generator=gen))
    b.live.fill_(True)
    b.live[1 % B] = B == 1
    S = model.model.lower_bounds.float().softmax(0)
    b.lower_bounds.copy_(S.cumsum(0) - S[0])
    before = b.state.clone()
    seen = []
    block = decode._block_step
    if fused:
        b.make_workspace(model)
        block = decode.fused_block(b)
    with torch.no_grad():
        generation._decode_step(model, b, generation._Sampling(True, None, False), block,
                                lambda model, x, b, spec: seen.append(x[:, 0].clone()))
    return seen[0], before, b.state


@needs_kernels
@pytest.mark.parametrize("B", [1, 3, 17])
def test_fused_step_equals_the_pytorch_step(B, small_blocks):
    model = tiny(seed=B).to(DEVICE)
    x_ref, before, s_ref = one_step(model, B, fused=False)
    x, before_fused, s = one_step(model, B, fused=True)
    assert torch.equal(before, before_fused)
    assert rel_err(x, x_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    if B > 1:
        assert torch.equal(s[:, 1], before[:, 1])  # row 1 is not live


@needs_kernels
@pytest.mark.parametrize("affine", [True, False])
def test_greedy_generation_fused_gives_the_pytorch_tokens(affine, small_blocks):
    model = tiny(seed=3, elementwise_affine=affine).to(DEVICE)
    ps = [[5, 17, 3], [40, 2, 9, 11, 60, 1], [8]]
    T = max(map(len, ps))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in ps], device=DEVICE)
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in ps], device=DEVICE)
    free = model.generate(ids, 5, temperature=0, attention_mask=mask, fused=False).result()
    eos = [free.tokens[1, 1].item()]  # row 1 stops after its second token; the others go on
    kw = dict(temperature=0, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    want = model.generate(ids, 5, fused=False, **kw).result()
    got = model.generate(ids, 5, fused=True, **kw).result()
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
    assert want.lengths[1] == 2 and rel_err(got.state, want.state) < 1e-5


def test_fused_choice_and_its_errors(monkeypatch):
    model = tiny(layers=1)
    ids = torch.zeros(1, 2, dtype=torch.long)
    assert decode.use_fused(model, False, "none") is False
    assert decode.use_fused(model, None, "none") is (DEVICE == "cuda")  # the CPU uses it when asked only
    with pytest.raises(ValueError, match="fused must be None, True or False"):
        model.generate(ids, 2, fused="yes")
    with pytest.raises(ValueError, match="head dims K = 12"):
        tiny(layers=1, hidden_size=48, expand_ratio=12).generate(ids, 2, fused=True)
    monkeypatch.setattr(decode, "_INTERPRETING", False)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="fused=True cannot run this model: the model is on cpu"):
            model.generate(ids, 2, fused=True)
    with pytest.raises(ValueError, match="capture='compile' compiles the PyTorch step"):
        decode.use_fused(model, True, "compile")


def test_decode_kernels_compile_with_programmatic_dependent_launch():
    """With PDL (the GPU's path; the interpreter cannot run griddepcontrol) every decode kernel
    variant compiles for sm_90 and waits for the previous kernel only after its first weight (or
    state) load; split-K variants order their partials before their counter's acq_rel atomic.
    Offline (Triton ships ptxas), in a process of its own (this one interprets)."""
    script = Path(__file__).resolve().parent / "offline.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script), "--decode-pdl"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # 4 matvec kernels x 3 regimes, split-K in 2 of them, the recurrent step
    assert run.stdout.count("PDL ok") == 21 and run.stdout.count("split-K ordered") == 8, run.stdout


# ----------------------------------------------------------------------------------------------
# CUDA: bf16 at the 374M model's shapes, captured fused steps
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 5, 32])
def test_kernels_at_the_374m_shapes_cuda(B, dtype):
    check_matvecs(B, 1024, 2816, True, B, dtype)
    for lb_kind in ("none", "mid", "near1"):
        check_recurrent(B, 8, 128, lb_kind, 30.0, 0.7, B, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("split", [2, 4, 8])
@pytest.mark.parametrize("B", [1, 32])
def test_split_k_at_the_374m_shapes_cuda(B, split, monkeypatch):
    """Split-K in bf16 at the 374M shapes, eagerly and replayed from a CUDA graph captured after an
    eager call (which makes the scratch): the same bits each time, the counters back at zero."""
    set_matvec_launch(monkeypatch, lambda r: dict(SPLIT_K=split))
    check_matvecs(B, 1024, 2816, True, B, torch.bfloat16)
    check_repeats(B, 1024, 2816, B, torch.bfloat16)
    gen = torch.Generator().manual_seed(split)
    x, h = randn(B, 1024, gen=gen, dtype=torch.bfloat16), torch.empty(B, 2816, device=DEVICE, dtype=torch.bfloat16)
    wg, wu = (randn(2816, 1024, gen=gen, scale=0.03, dtype=torch.bfloat16) for _ in range(2))
    wd, res = randn(1024, 2816, gen=gen, scale=0.02, dtype=torch.bfloat16), x.clone()

    def step():
        kd.norm_glu(x, None, 1e-6, wg, wu, h)
        kd.matvec_add(h, wd, res)

    step()
    want = (h.clone(), res.clone())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(2):
        h.zero_()
        res.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(h, want[0]) and torch.equal(res, want[1]) and not kl._SCRATCH[x.device][1].any()


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 4, 32])
def test_fused_step_logits_match_the_pytorch_step_bf16(B):
    model = tiny(seed=1, vocab_size=512, hidden_size=256, layers=4, expand_ratio=64, intermediate_size=688)
    model = model.to("cuda", torch.bfloat16)
    for fused in (False, True):
        x, _, s = one_step(model, B, fused)
        with torch.no_grad():
            logits = model.lm_head(model.model.norm(x)).float()
        if not fused:
            want, s_want = logits, s
    assert rel_err(logits, want) < 2e-2 and rel_err(s, s_want) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("capture", ["graph", "compile+graph"])
def test_captured_fused_step_gives_the_eager_fused_tokens(capture):
    model = tiny(seed=2, vocab_size=512, hidden_size=256, layers=4, expand_ratio=64).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 512, (4, 33), device="cuda")
    for _ in range(2):  # the second call replays the captured graph
        eager = model.generate(ids, 40, temperature=0, capture="none", fused=True).result()
        graphed = model.generate(ids, 40, temperature=0, capture=capture, fused=True).result()
        if capture == "graph":  # the same kernels: the same bits
            assert torch.equal(graphed.tokens, eager.tokens) and rel_err(graphed.state, eager.state) == 0
        else:  # the compiled head rounds differently: the two may part at a near tie only
            agree_until_a_near_tie(model, ids, torch.ones_like(ids), eager.tokens, graphed.tokens, 3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 4, 32])
def test_programmatic_dependent_launch_changes_no_bit_cuda(B, monkeypatch):
    """With PDL each kernel starts while the previous one finishes and loads its first weight slice
    before waiting (`_after_previous_kernel`): the same step, bit for bit, eagerly and replayed from
    a CUDA graph."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability 9 or more")
    model = tiny(seed=4, vocab_size=512, hidden_size=256, layers=4, expand_ratio=64).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 512, (B, 17), device="cuda", generator=torch.Generator("cuda").manual_seed(B))
    results = {}
    for pdl in (False, True):
        monkeypatch.setattr(kd, "USE_PDL", pdl)
        model.__dict__.pop("_decoder", None)  # graphs captured afresh with this setting
        x, _, s = one_step(model, B, fused=True)
        graphed = model.generate(ids, 24, temperature=0, capture="graph", fused=True).result()
        results[pdl] = (x, s, graphed.tokens, graphed.state)
    for a, b in zip(results[False], results[True]):
        assert torch.equal(a, b)

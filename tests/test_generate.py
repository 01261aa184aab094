"""Generation (hgrn2mini.generation): greedy against the argmax of full forwards, left padding,
continuing from a state, eos per row, constant memory, sampling, input errors; on CUDA the
captured steps against the eager one and no compilation after warm-up."""

import gc

import pytest
import torch
from hgrn2mini.kernels.gates import gates_triton
from hgrn2mini.kernels.launch import launcher
from naive import rel_err

from hgrn2mini import HGRN2Config, HGRN2ForCausalLM, prefill
from hgrn2mini import generation as gen
from hgrn2mini.generation import CHECK_EVERY, sample, warmup
from hgrn2mini.model import MASKED_F_LOGIT
from hgrn2mini.ops import gates

TOL_FP32 = 2e-5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny(seed=0, **overrides):
    """D = 64, H = 4 heads of K = V = 16, 3 layers, random everything. initializer_range 0.2 makes
    the logits decisive (top-2 gaps far above fp32 rounding), so greedy tokens are well defined."""
    cfg = dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, expand_ratio=16, initializer_range=0.2)
    torch.manual_seed(seed)
    model = HGRN2ForCausalLM(HGRN2Config(**{**cfg, **overrides})).eval()
    with torch.no_grad():
        model.model.lower_bounds.normal_(0.0, 1.0)
        for layer in model.model.layers:
            layer.attn.g_norm.weight.uniform_(0.5, 1.5)
    return model


def left_pad(prompts, pad_id=5):
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def prompts(lengths, vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def forward_state(model, ids):
    with torch.no_grad():
        return model(ids, return_state=True).state


# ----------------------------------------------------------------------------------------------
# Greedy, streaming, padding
# ----------------------------------------------------------------------------------------------


def test_greedy_generate_equals_argmax_of_full_forward():
    model = tiny(seed=6)
    prompt = torch.randint(0, 97, (2, 9))
    tokens = list(model.generate(prompt, max_new_tokens=6, temperature=0))
    assert len(tokens) == 6
    seq = prompt
    for tok in tokens:
        assert tok.shape == (2,) and tok.dtype == torch.long
        assert torch.equal(tok, model(seq).logits[:, -1].argmax(-1))
        seq = torch.cat([seq, tok[:, None]], 1)
    out = model.generate(prompt, 6, temperature=0).result()
    assert torch.equal(out.tokens, seq[:, 9:]) and out.lengths.tolist() == [6, 6]
    # The state holds every token returned, the last one included.
    assert rel_err(out.state, forward_state(model, seq)) < TOL_FP32


def test_zero_new_tokens_reads_the_prompt_only():
    model = tiny()
    prompt = torch.randint(0, 97, (2, 5))
    assert list(model.generate(prompt, 0)) == []
    out = model.generate(prompt, 0).result()
    assert out.tokens.shape == (2, 0) and out.lengths.tolist() == [0, 0]
    assert rel_err(out.state, forward_state(model, prompt)) < TOL_FP32


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = tiny(seed=2)
    ps = prompts([3, 12, 7, 1])
    ids, mask = left_pad(ps)
    batch = model.generate(ids, 10, temperature=0, attention_mask=mask).result()
    for i, p in enumerate(ps):
        alone = model.generate(torch.tensor([p]), 10, temperature=0).result()
        assert torch.equal(batch.tokens[i], alone.tokens[0]), i
        assert rel_err(batch.state[:, i], alone.state[:, 0]) < TOL_FP32


def test_padding_leaves_the_state_exactly_unchanged():
    # The gates at the masked logit: g = 0 and k = 1 - f = 0 exactly, bound or not, every dtype,
    # in PyTorch (the decode step, the CPU) and in the Triton kernel (the op on CUDA; on the CPU
    # Triton's interpreter, fp32 only: it gets bf16 wrong).
    lbs = (None, torch.tensor([0.0, 1e-6, 0.3, 0.5, 0.9, 0.99, 0.999, 1 - 2**-20]).repeat(2))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        f = torch.full((2, 16), MASKED_F_LOGIT, dtype=dtype)
        for lb in lbs:
            _, g = gates(f, f, lb)
            assert (g == 0).all() and (-torch.expm1(g) == 0).all(), (dtype, lb)
            if dtype == torch.float32 or (DEVICE == "cuda" and dtype == torch.bfloat16):
                _, g = gates_triton(f.to(DEVICE), f.to(DEVICE), lb.to(DEVICE) if lb is not None else None, launcher)
                assert (g == 0).all(), ("triton", dtype, lb)
    # Through the model: a row of padding leaves a given state bit for bit as it was.
    model = tiny()
    state = torch.randn(model.model.state_shape(2))
    ids = torch.randint(0, 97, (2, 70))  # more than one 64-token chunk
    out = model(ids, state=state, attention_mask=torch.zeros_like(ids))
    assert torch.equal(out.state, state) and torch.isfinite(out.logits).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_attention_mask_is_exact_under_autograd(device):
    """A left-padded row's loss (the padding's targets -100) and gradients equal the row's alone;
    on CUDA through the Triton kernels (fp32, K = 16), to test_kernels' fp32 tolerance."""
    tol = TOL_FP32 if device == "cpu" else 1e-4
    model = tiny(seed=3).train().to(device)
    p = prompts([9])[0]
    ids = torch.tensor([[11] * 5 + p], device=device)
    mask = torch.tensor([[0] * 5 + [1] * 9], device=device)
    labels = torch.tensor([[-100] * 6 + p[1:]], device=device)  # position t predicts labels[t + 1]

    def loss_and_grads(ids, labels, mask=None):
        model.zero_grad()
        loss = model(ids, labels=labels, attention_mask=mask).loss
        loss.backward()
        return loss, [q.grad.clone() for q in model.parameters()]

    loss_pad, grads_pad = loss_and_grads(ids, labels, mask)
    alone = torch.tensor([p], device=device)
    loss_alone, grads_alone = loss_and_grads(alone, alone)
    assert rel_err(loss_pad, loss_alone) < tol
    for a, b in zip(grads_pad, grads_alone):
        assert torch.isfinite(a).all() and rel_err(a, b) < tol


# ----------------------------------------------------------------------------------------------
# State, eos, memory
# ----------------------------------------------------------------------------------------------


def test_continuing_from_a_returned_state_equals_one_long_generation():
    model = tiny(seed=4)
    P = torch.randint(0, 97, (2, 6))
    Q = torch.randint(0, 97, (2, 3))
    first = model.generate(P, 5, temperature=0).result()
    assert torch.equal(model.generate(P, 12, temperature=0).result().tokens[:, :5], first.tokens)
    turn = model.generate(Q, 7, temperature=0, state=first.state).result()
    whole = model.generate(torch.cat([P, first.tokens, Q], 1), 7, temperature=0).result()
    assert torch.equal(turn.tokens, whole.tokens)
    assert rel_err(turn.state, whole.state) < TOL_FP32
    # A state given on its own: the prompt starts from it.
    start = torch.randn(model.model.state_shape(2)) * 0.5
    out = model.generate(Q, 4, temperature=0, state=start).result()
    seq = Q
    for t in range(4):
        with torch.no_grad():
            logits = model(seq, state=start).logits[:, -1]
        assert torch.equal(out.tokens[:, t], logits.argmax(-1))
        seq = torch.cat([seq, out.tokens[:, t : t + 1]], 1)


def test_eos_stops_each_row_on_its_own():
    model = tiny(seed=5)
    ps = prompts([4, 8, 6], seed=3)
    ids, mask = left_pad(ps)
    free = model.generate(ids, 12, temperature=0, attention_mask=mask).result().tokens
    eos = [free[0, 2].item(), free[1, 7].item()]
    out = model.generate(ids, 12, temperature=0, attention_mask=mask, eos_token_id=eos, pad_token_id=0).result()
    for i, p in enumerate(ps):
        row = free[i].tolist()
        n = next((j + 1 for j, t in enumerate(row) if t in eos), 12)
        assert out.lengths[i].item() == n, i
        assert out.tokens[i, :n].tolist() == row[:n] and (out.tokens[i, n:] == 0).all()
        # The row's state holds its prompt and its tokens up to its eos, nothing after.
        alone = forward_state(model, torch.tensor([p + row[:n]]))
        assert rel_err(out.state[:, i], alone[:, 0]) < TOL_FP32
    assert out.tokens.shape[1] == out.lengths.max().item()


def test_generation_stops_soon_after_every_row_has_finished():
    model = tiny(seed=5)
    ids = torch.randint(0, 97, (2, 4))
    free = model.generate(ids, 3, temperature=0).result().tokens
    eos = [free[0, 0].item(), free[1, 1].item()]
    steps = list(model.generate(ids, 500, temperature=0, eos_token_id=eos))
    assert len(steps) <= 2 + 2 * CHECK_EVERY
    assert all((s == eos[0]).all() for s in steps[2:])  # finished rows give the pad (the first eos)


def test_decode_memory_does_not_grow_with_the_number_of_tokens():
    model = tiny()
    it = model.generate(torch.randint(0, 97, (2, 5)), 200, temperature=0.7, top_k=20)
    next(it)
    buffers = gen._Decoder.of(model).buffers[2]
    ptrs = [t.data_ptr() for t in buffers.tensors()]

    def live_tensors():
        gc.collect()
        return sum(type(o) is torch.Tensor for o in gc.get_objects())

    for _ in range(10):
        next(it)
    before = live_tensors()
    for _ in range(150):
        next(it)
    assert live_tensors() == before
    assert [t.data_ptr() for t in buffers.tensors()] == ptrs
    # A later call with this batch size reuses the buffers; the returned state is a copy.
    out = it.result()
    again = model.generate(torch.randint(0, 97, (2, 3)), 4, temperature=0).result()
    assert [t.data_ptr() for t in gen._Decoder.of(model).buffers[2].tensors()] == ptrs
    assert out.state.data_ptr() != again.state.data_ptr() != buffers.state.data_ptr()


def test_a_generation_whose_buffers_another_took_says_so():
    model = tiny()
    ids = torch.randint(0, 97, (2, 4))
    first = model.generate(ids, 5, temperature=0)
    next(first)
    done = model.generate(ids, 3, temperature=0).result()  # takes batch size 2's buffers
    with pytest.raises(RuntimeError, match="another generation at this batch size started"):
        next(first)
    assert model.generate(ids[:1], 3, temperature=0).result().tokens.shape == (1, 3)  # its own buffers
    assert done.tokens.shape == (2, 3)


def test_streamed_tokens_are_the_result_and_grad_mode_is_left_alone():
    model = tiny()
    ids = torch.randint(0, 97, (3, 4))
    it = model.generate(ids, 7, generator=torch.Generator().manual_seed(1))
    streamed = []
    for tok in it:
        assert torch.is_grad_enabled()
        streamed.append(tok)
    assert torch.equal(torch.stack(streamed, 1), it.result().tokens)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def test_seeded_sampling_reproduces_and_top_k_1_or_tiny_top_p_is_greedy():
    model = tiny(seed=7)
    ids = torch.randint(0, 97, (3, 4))

    def run(**kw):
        return model.generate(ids, 20, **kw).result().tokens

    a = run(generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, run(generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(a, run(generator=torch.Generator().manual_seed(1)))
    greedy = run(temperature=0)
    assert not torch.equal(a, greedy)
    assert torch.equal(run(top_k=1), greedy)
    assert torch.equal(run(top_p=1e-6), greedy)


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_p=0.5), dict(top_k=5, top_p=0.7, temperature=2.0)])
def test_sampled_tokens_are_among_the_allowed(kw):
    model = tiny(seed=8, initializer_range=0.05)  # flatter logits: many tokens compete
    ids = torch.randint(0, 97, (4, 5))
    out = model.generate(ids, 16, generator=torch.Generator().manual_seed(2), **kw).result()
    seq = torch.cat([ids, out.tokens], 1)
    with torch.no_grad():
        logits = model(seq).logits[:, 4:-1].float() / kw.get("temperature", 1.0)  # predicting each new token
    sorted_logits = logits.sort(-1, descending=True).values
    rank = (logits > logits.gather(-1, out.tokens[..., None])).sum(-1)  # tokens strictly more likely
    if "top_k" in kw:
        assert (rank < kw["top_k"]).all()
    if "top_p" in kw:
        p = sorted_logits.softmax(-1)
        before = (p.cumsum(-1) - p).gather(-1, rank[..., None])[..., 0]  # mass strictly before the token
        assert (before < kw["top_p"] + 1e-6).all()
    assert (rank > 0).any()  # not merely greedy


def test_sample_top_k_and_top_p_keep_only_allowed_tokens():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, top_k=2, generator=g).tolist()) == {1, 2}
    # softmax mass: token 1 ~0.64, token 2 ~0.24; top_p 0.8 keeps exactly those two.
    assert set(sample(logits, top_p=0.8, generator=g).tolist()) == {1, 2}
    # Unrestricted sampling follows the softmax: token 1's frequency near its probability.
    got = sample(logits, generator=g)
    p1 = torch.softmax(logits[0], -1)[1].item()
    assert abs((got == 1).double().mean().item() - p1) < 0.04


# ----------------------------------------------------------------------------------------------
# Errors and warm-up
# ----------------------------------------------------------------------------------------------


def test_bad_arguments_get_errors_that_name_them():
    model = tiny()
    ids = torch.randint(0, 97, (2, 5))
    state3 = torch.zeros(model.model.state_shape(3))
    for kwargs, err, match in [
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be an int >= 0, got -1"),
        (dict(max_new_tokens=2.0), ValueError, "max_new_tokens"),
        (dict(temperature=-1.0), ValueError, "temperature must be"),
        (dict(top_k=0), ValueError, "top_k must be"),
        (dict(top_p=1.5), ValueError, "top_p must be"),
        (dict(eos_token_id=97), ValueError, r"eos_token_id must be token ids in \[0, vocab_size=97\), got 97"),
        (dict(eos_token_id=[1, -1]), ValueError, "eos_token_id"),
        (dict(pad_token_id=500), ValueError, "pad_token_id"),
        (dict(pad_token_id=[1, 2]), ValueError, r"pad_token_id must be token ids .* got \[1, 2\]"),
        (dict(attention_mask=torch.ones(2, 4)), TypeError, "attention_mask must be a bool or integer"),
        (dict(attention_mask=torch.ones(2, 4, dtype=torch.long)), ValueError,
         r"attention_mask must have input_ids' shape \[2, 5\], got \[2, 4\]"),
        (dict(attention_mask=torch.tensor([[1, 1, 0, 1, 1]] * 2)), ValueError, "attention_mask must be left-padded"),
        (dict(attention_mask=torch.tensor([[1, 1, 1, 1, 0]] * 2)), ValueError, "attention_mask must be left-padded"),
        (dict(attention_mask=torch.full((2, 5), 2)), ValueError, "attention_mask must hold only 0"),
        (dict(state=state3), ValueError, "state must have input_ids' batch size 2"),
        (dict(state=torch.zeros(model.model.state_shape(2)).double()), TypeError, "state must be float32"),
        (dict(capture="cudagraph"), ValueError, "capture must be one of"),
        (dict(capture="graph"), ValueError, "capture='graph' needs the model on CUDA"),
        (dict(generator=0), ValueError, "generator must be a torch.Generator on the model's device cpu, got 0"),
    ]:
        kwargs = {"max_new_tokens": 3, **kwargs}
        with pytest.raises(err, match=match):
            model.generate(ids, kwargs.pop("max_new_tokens"), **kwargs)
    with pytest.raises(TypeError, match="input_ids"):
        model.generate(ids.float(), 3)
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        model(ids, attention_mask=torch.ones(2, 6, dtype=torch.bool))


def test_warmup_runs_each_shape_and_counts_compilations():
    model = tiny()
    warmup(model, batch_sizes=(1, 2), prompt_lengths=(3, 17), temperature=0)
    counts = gen.compile_counts()
    assert set(counts) == {"dynamo_graphs", "triton_kernels"} and all(v >= 0 for v in counts.values())
    assert set(gen._Decoder.of(model).buffers) == {1, 2}


# ----------------------------------------------------------------------------------------------
# CUDA: the captured steps against the eager one, and no compilation after warm-up
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def many_recompiles(monkeypatch):
    """These tests compile the step for several dtypes, batch sizes and models in one process:
    more graphs per function than torch.compile's default limit of 8 keeps."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            monkeypatch.setattr(torch._dynamo.config, name, 64)


def cuda_model(dtype, seed=0):
    """K = V = 64: the Triton path in bf16 and fp32. Decisive logits (initializer_range 0.2)."""
    return tiny(seed, vocab_size=512, hidden_size=256, num_hidden_layers=4, expand_ratio=64).to("cuda", dtype)


def agree_until_a_near_tie(model, ids, mask, want, got, rel_margin):
    """got == want, or they part at a step where want's top two logits (eager forward over the
    prompt and want's tokens) are within rel_margin of the largest |logit|: a rounding tie."""
    differ = (want != got).any(0).nonzero()
    if len(differ) == 0:
        return
    n = differ[0].item()
    with torch.no_grad():
        seq = torch.cat([ids, want[:, :n]], 1)
        logits = model(seq, attention_mask=torch.cat([mask, torch.ones_like(want[:, :n])], 1)).logits[:, -1].float()
    top2 = logits.topk(2, -1).values
    rows = want[:, n] != got[:, n]
    margin = (top2[:, 0] - top2[:, 1])[rows]
    assert (margin <= rel_margin * logits[rows].abs().amax(-1)).all(), (n, margin)


@pytest.mark.gpu
@pytest.mark.parametrize("capture", ["graph", "compile", "compile+graph"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 4])
def test_captured_step_gives_the_eager_tokens(capture, dtype, B, many_recompiles):
    model = cuda_model(dtype)
    ids, mask = left_pad(prompts([37, 5, 64, 100][:B], vocab=512))
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(attention_mask=mask, temperature=0, eos_token_id=[7, 11])
    for _ in range(2):  # the second call replays the graphs captured by the first
        eager = model.generate(ids, 48, capture="none", **kw).result()
        graphed = model.generate(ids, 48, capture=capture, **kw).result()
        # The CUDA graph of the eager step runs the same kernels: the same bits. Inductor computes
        # bf16 intermediates in fp32 inside its fused kernels, so in bf16 the compiled step's
        # logits differ in the last bits and the two may part at a near tie, never elsewhere.
        if capture == "graph" or dtype == torch.float32:
            assert torch.equal(graphed.tokens, eager.tokens) and torch.equal(graphed.lengths, eager.lengths)
            assert rel_err(graphed.state, eager.state) <= (0 if capture == "graph" else 1e-4)
        else:
            agree_until_a_near_tie(model, ids, mask, eager.tokens, graphed.tokens, 3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_step_samples_what_the_eager_step_samples(dtype):
    model = cuda_model(dtype, seed=1)
    ids, mask = left_pad(prompts([20, 3, 9, 64], vocab=512))
    ids, mask = ids.cuda(), mask.cuda()
    runs = {}
    for capture in ("none", "graph", "graph"):
        g = torch.Generator("cuda").manual_seed(3)
        runs[capture] = model.generate(ids, 200, 0.8, 50, 0.9, g, attention_mask=mask, capture=capture).result()
    assert torch.equal(runs["graph"].tokens, runs["none"].tokens)
    assert runs["none"].tokens.unique().numel() > 20  # sampled, not stuck on one token


@pytest.mark.gpu
def test_no_compilation_after_warmup_across_five_prompt_lengths(many_recompiles):
    model = cuda_model(torch.bfloat16)
    lengths = (100, 257, 512, 1000, 2048)  # not among the warm-up's own lengths (prefill_lengths)
    warmup(model, batch_sizes=(1, 4), max_prompt_len=2048, temperature=0, capture="compile+graph")
    before = gen.compile_counts()
    assert before["triton_kernels"] > 0 and before["dynamo_graphs"] > 0  # the counters see compilations
    g = torch.Generator().manual_seed(0)
    for B in (1, 4):
        for T in lengths:
            ps = [torch.randint(0, 512, (T - 13 * i,), generator=g).tolist() for i in range(B)]
            ids, mask = left_pad(ps)
            model.generate(ids.cuda(), 8, temperature=0, attention_mask=mask.cuda(), capture="compile+graph").result()
            model.generate(ids.cuda(), 8, temperature=0, capture="compile+graph").result()  # unmasked
    assert gen.compile_counts() == before


# ----------------------------------------------------------------------------------------------
# Prompts read at bucketed lengths (hgrn2mini.prefill; on CUDA, captured)
# ----------------------------------------------------------------------------------------------


def test_buckets_and_pieces_cover_every_length(monkeypatch):
    monkeypatch.setattr(prefill, "MAX_BUCKET", 256)
    for T in range(1, 1100):
        b = prefill.bucket(T)
        assert b in (64, 128, 256) and (b >= T or b == 256) and (b == 64 or b // 2 < T), (T, b)
        ps = prefill.pieces(T)
        assert ps[0][0] == 0 and ps[-1][1] == T and all(p[1] == q[0] for p, q in zip(ps, ps[1:])), (T, ps)
        assert 1 <= ps[0][1] <= 256 and all(e - s == 256 for s, e in ps[1:]), (T, ps)


def prefills(model, buffer, captured, pool=None):
    """A get(bucket length) for `prefill.read_prompt`, making each bucket's Prefill once, and what it made."""
    made = {}

    def get(Tb):
        if Tb not in made:
            made[Tb] = prefill.Prefill(model, Tb, buffer, captured, pool)
        return made[Tb]
    return get, made


@pytest.mark.parametrize("T", [1, 7, 64, 65, 150])
@pytest.mark.parametrize("with_state", [False, True])
def test_bucketed_prompt_equals_the_plain_forward(T, with_state, monkeypatch):
    """A left-padded batch read at its bucket length, past MAX_BUCKET (64 here) in pieces that
    each start from the state the previous one left in the shared buffer: the plain forward's last
    hidden state and state, to fp32 rounding."""
    monkeypatch.setattr(prefill, "MAX_BUCKET", 64)
    model = tiny(seed=T)
    ids, mask = left_pad(prompts([T, max(1, T - 5)]))
    state0 = torch.randn(model.model.state_shape(2)) * 0.5 if with_state else None
    buffer = torch.full(model.model.state_shape(2), float("nan"))
    get, made = prefills(model, buffer, False)
    with torch.no_grad():
        x_ref, s_ref = model.model(ids, state0, return_state=True, attention_mask=mask)
        x, s = prefill.read_prompt(get, ids, mask, state0)
    assert s is buffer and list(made) == [64]
    assert rel_err(x, x_ref[:, -1]) <= TOL_FP32 and rel_err(s, s_ref) <= TOL_FP32


def test_generation_with_bucketed_prompts_gives_the_same_tokens(monkeypatch):
    """generate's bucketed path (CUDA's, run eagerly here): the tokens and the state of the plain
    path, for a left-padded batch and a prompt longer than MAX_BUCKET."""
    model = tiny(seed=9)
    ids, mask = left_pad(prompts([150, 40, 3]))
    kw = dict(temperature=0, attention_mask=mask, capture="none", fused=False)
    want = model.generate(ids, 12, **kw).result()
    monkeypatch.setattr(gen, "_bucketed", lambda ids: True)
    monkeypatch.setattr(prefill, "MAX_BUCKET", 128)
    got = model.generate(ids, 12, **kw).result()
    assert set(gen._Decoder.of(model).prefills) == {(3, 64, False), (3, 128, False)}
    assert torch.equal(got.tokens, want.tokens) and rel_err(got.state, want.state) <= TOL_FP32


@pytest.mark.gpu
def test_captured_prompt_reads_what_the_eager_one_reads(monkeypatch):
    """Prefill's CUDA graphs, replayed for pieces chained through the shared state buffer (three
    pieces past MAX_BUCKET = 128), against the same bucketed forward run eagerly: the same bits."""
    monkeypatch.setattr(prefill, "MAX_BUCKET", 128)
    model = cuda_model(torch.bfloat16)
    ids, mask = left_pad(prompts([300, 77], vocab=512))
    ids, mask = ids.cuda(), mask.cuda()
    state0 = torch.randn(model.model.state_shape(2), device="cuda") * 0.3
    runs = []
    with torch.no_grad():
        for captured in (False, True):
            buffer = torch.zeros(model.model.state_shape(2), device="cuda")
            get, made = prefills(model, buffer, captured, torch.cuda.graph_pool_handle() if captured else None)
            for _ in range(2):  # captured: the first call captures, the second replays
                x, s = prefill.read_prompt(get, ids, mask, state0)
                runs.append((x.clone(), s.clone()))
            assert sorted(made) == [64, 128]
    for x, s in runs[1:]:
        assert torch.equal(x, runs[0][0]) and torch.equal(s, runs[0][1])
    assert torch.isfinite(runs[0][1]).all()

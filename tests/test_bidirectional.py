"""The bidirectional token mixer and HGRN2ForSequenceClassification: against a float64 reference
written here from the equations (one step at a time, both directions, gradients too), the
reversal property, padding, compile / export and checkpoints."""

import pytest
import torch
import torch.nn.functional as F
from naive import rel_err

from hgrn2mini import HGRN2Config, HGRN2ForCausalLM, HGRN2ForSequenceClassification, SequenceClassifierOutput
from hgrn2mini.model import HGRN2Attention

TOL_FP32 = 2e-5


def config(**overrides):
    # D = 48, H = 3 heads of K = V = 16; T up to 70 crosses the op's 64-token chunk.
    base = dict(vocab_size=31, hidden_size=48, num_hidden_layers=2, expand_ratio=16, bidirectional=True,
                num_labels=5)
    return HGRN2Config(**{**base, **overrides})


def randomize(module, seed, f_scale=1.0):
    """Every parameter random (norm weights around 1), forget logits scaled by f_scale."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3 if "proj" in name else 1.0)
                if "f_proj" in name:
                    p.mul_(f_scale)
    return module


def mixer_reference(x, Wq, Wf, Wi, Wo, norm_w, lb, H, directions):
    """The mixer from the equations in float64, one step at a time:
    q = silu(x Wq^T), f = lb + (1 - lb) sigmoid(x Wf^T), v = x Wi^T,
    forward: h_t = diag(f_t) h_{t-1} + (1 - f_t) v_t^T, y_t = (K^-1/2 q_t)^T h_t;
    reverse: the same with h_{t+1}; y = the directions summed; out = RMSNorm(y, eps 1e-5) Wo^T."""
    B, T, D = x.shape
    K = V = D // H
    q = F.silu(x @ Wq.T).view(B, T, H, K) * K**-0.5
    f = (lb + (1 - lb) * torch.sigmoid(x @ Wf.T)).view(B, T, H, K)
    v = (x @ Wi.T).view(B, T, H, V)
    y = torch.zeros(B, T, H, V, dtype=x.dtype)
    for direction in directions:
        h = torch.zeros(B, H, K, V, dtype=x.dtype)
        steps = range(T) if direction == "forward" else range(T - 1, -1, -1)
        ys = {}
        for t in steps:
            h = f[:, t, :, :, None] * h + (1 - f[:, t, :, :, None]) * v[:, t, :, None, :]
            ys[t] = torch.einsum("bhk,bhkv->bhv", q[:, t], h)
        y = y + torch.stack([ys[t] for t in range(T)], 1)
    y = y.reshape(B, T, D)
    y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + 1e-5) * norm_w
    return y @ Wo.T


# Causal T = 1 is the decode step, tested in test_model.py.
@pytest.mark.parametrize("T, bidirectional", [(1, True), (7, True), (70, True), (7, False), (70, False)])
@pytest.mark.parametrize("f_scale", [1.0, 8.0])  # 8: gates near 0 and 1
def test_mixer_matches_float64_reference(T, bidirectional, f_scale):
    cfg = config(bidirectional=bidirectional)
    mixer = randomize(HGRN2Attention(cfg, layer_idx=1), seed=T, f_scale=f_scale)
    torch.manual_seed(100 + T)
    x = torch.randn(2, T, cfg.hidden_size, requires_grad=True)
    lb = torch.rand(cfg.hidden_size) * 0.9
    out, state = mixer(x, lb, None)
    assert (state is None) == bidirectional
    do = torch.randn_like(out)
    params = [mixer.q_proj.weight, mixer.f_proj.weight, mixer.i_proj.weight, mixer.o_proj.weight,
              mixer.g_norm.weight]
    got_grads = torch.autograd.grad(out, [x, *params], do)

    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    directions = ("forward", "reverse") if bidirectional else ("forward",)
    want = mixer_reference(x64, *p64, lb.double(), cfg.num_heads, directions)
    want_grads = torch.autograd.grad(want, [x64, *p64], do.double())
    assert rel_err(out, want) < TOL_FP32
    for name, g, w in zip(["x", "q_proj", "f_proj", "i_proj", "o_proj", "g_norm"], got_grads, want_grads):
        assert rel_err(g, w) < 10 * TOL_FP32, name


def test_reversed_input_reverses_the_reverse_pass():
    """The reverse pass read on a reversed input gives the forward pass's outputs reversed, and
    the bidirectional mixer's output on a reversed input is its output reversed."""
    cfg = config()
    mixer = randomize(HGRN2Attention(cfg, layer_idx=1), seed=3)
    causal = randomize(HGRN2Attention(config(bidirectional=False), layer_idx=1), seed=3)
    torch.manual_seed(4)
    x = torch.randn(2, 37, cfg.hidden_size)
    lb = torch.rand(cfg.hidden_size) * 0.9
    both = mixer(x, lb, None)[0]
    assert rel_err(mixer(x.flip(1), lb, None)[0], both.flip(1)) < TOL_FP32
    # The reverse pass alone: the bidirectional output's pre-norm sum minus the causal one.
    pre = {}
    for name, m in (("both", mixer), ("forward", causal)):
        m.g_norm.register_forward_hook(lambda mod, inp, out, name=name: pre.__setitem__(name, inp[0]))
    mixer(x, lb, None), causal(x, lb, None)
    reverse = pre["both"] - pre["forward"]
    causal(x.flip(1), lb, None)
    assert rel_err(reverse, pre["forward"].flip(1)) < TOL_FP32


def test_padding_at_either_end_changes_nothing():
    cfg = config()
    model = randomize(HGRN2ForSequenceClassification(cfg), seed=5).eval()
    torch.manual_seed(6)
    ids = torch.randint(1, cfg.vocab_size, (1, 23))
    alone = model(ids).logits
    pad = torch.zeros(1, 9, dtype=ids.dtype)
    for padded, mask in (
        (torch.cat([ids, pad], 1), torch.cat([torch.ones_like(ids), pad], 1)),  # right padding
        (torch.cat([pad, ids], 1), torch.cat([pad, torch.ones_like(ids)], 1)),  # left padding
    ):
        assert rel_err(model(padded, attention_mask=mask).logits, alone) < TOL_FP32
        assert rel_err(model(padded, attention_mask=mask.bool()).logits, alone) < TOL_FP32


def test_classifier_loss_and_pooling():
    cfg = config()
    model = randomize(HGRN2ForSequenceClassification(cfg), seed=7)
    ids = torch.randint(0, cfg.vocab_size, (3, 20))
    labels = torch.tensor([0, 4, 2])
    out = model(ids, labels=labels)
    assert isinstance(out, SequenceClassifierOutput) and out.logits.shape == (3, 5)
    x, _ = model.model(ids)
    want = model.score(x.mean(1))
    assert rel_err(out.logits, want) < TOL_FP32
    assert rel_err(out.loss, F.cross_entropy(want.double(), labels)) < TOL_FP32
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_classifier_compiles_without_breaks_and_exports(tmp_path):
    cfg = config()
    model = randomize(HGRN2ForSequenceClassification(cfg), seed=8)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    labels = torch.tensor([1, 3])
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(ids, labels=labels, attention_mask=mask)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(ids, labels=labels, attention_mask=mask)
    want = model(ids, labels=labels, attention_mask=mask)
    assert rel_err(got.logits, want.logits) < TOL_FP32 and rel_err(got.loss, want.loss) < TOL_FP32
    g_got = torch.autograd.grad(got.loss, list(model.parameters()))
    g_want = torch.autograd.grad(want.loss, list(model.parameters()))
    for g, w in zip(g_got, g_want):
        assert rel_err(g, w) < 10 * TOL_FP32
    torch._dynamo.reset()

    model.eval()
    program = torch.export.export(model, (ids,), {"attention_mask": mask})
    path = tmp_path / "classifier.pt2"
    torch.export.save(program, path)
    out = torch.export.load(path).module()(ids, attention_mask=mask)
    assert isinstance(out, SequenceClassifierOutput)
    assert rel_err(out.logits, model(ids, attention_mask=mask).logits) < TOL_FP32


def test_classifier_save_load_round_trip(tmp_path):
    cfg = config(num_labels=3)
    model = randomize(HGRN2ForSequenceClassification(cfg), seed=9)
    model.save_pretrained(tmp_path)
    loaded = HGRN2ForSequenceClassification.from_pretrained(tmp_path)
    assert loaded.config == cfg and loaded.config.bidirectional and loaded.config.num_labels == 3
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert '"HGRN2ForSequenceClassification"' in (tmp_path / "config.json").read_text()


def test_causal_checkpoint_loads_into_a_bidirectional_model(tmp_path):
    """Shared parameters: a causal LM's checkpoint is a bidirectional LM's, key for key."""
    causal = HGRN2ForCausalLM(config(bidirectional=False))
    causal.save_pretrained(tmp_path)
    assert HGRN2ForCausalLM.from_pretrained(tmp_path).config.bidirectional is False
    bidir = HGRN2ForCausalLM(config())
    assert causal.state_dict().keys() == bidir.state_dict().keys()
    bidir.load_state_dict(causal.state_dict())


def test_bad_arguments():
    cfg = config()
    model = HGRN2ForSequenceClassification(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    with pytest.raises(ValueError, match=r"labels must be in \[0, num_labels=5\), got 1 values outside it, in \[5, 5"):
        model(ids, labels=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, num_labels=5\).*\[-100, -100\]"):
        model(ids, labels=torch.tensor([-100, 1]))
    with pytest.raises(ValueError, match=r"labels must have shape \[2\], got \[2, 6\]"):
        model(ids, labels=ids)
    with pytest.raises(TypeError, match="labels must be an integer tensor of ids, got dtype torch.float32"):
        model(ids, labels=torch.zeros(2))
    with pytest.raises(ValueError, match=r"attention_mask must have input_ids' shape \[2, 6\], got \[2, 5\]"):
        model(ids, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, vocab_size=31\)"):
        model(ids + 31)
    with pytest.raises(ValueError, match="state and return_state need a causal model"):
        model.model(ids, return_state=True)
    with pytest.raises(ValueError, match="state and return_state need a causal model"):
        next(HGRN2ForCausalLM(cfg).generate(ids, 2))
    with pytest.raises(ValueError, match="num_labels must be a positive int, got 0"):
        config(num_labels=0)
    with pytest.raises(ValueError, match="bidirectional must be a bool, got 'yes'"):
        config(bidirectional="yes")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_mixer_matches_float64_reference_cuda(dtype, tol):
    """On the GPU both directions run the Triton kernels (K = V = 32, T crossing chunks)."""
    cfg = config(hidden_size=128, expand_ratio=32)
    mixer = randomize(HGRN2Attention(cfg, layer_idx=1), seed=12).cuda().to(dtype)
    mixer.g_norm.float()
    torch.manual_seed(13)
    x = torch.randn(2, 300, 128, device="cuda", dtype=dtype, requires_grad=True)
    lb = torch.rand(128, device="cuda") * 0.9
    out, _ = mixer(x, lb, None)
    do = torch.randn_like(out)
    params = [mixer.q_proj.weight, mixer.f_proj.weight, mixer.i_proj.weight, mixer.o_proj.weight,
              mixer.g_norm.weight]
    got = [out, *torch.autograd.grad(out, [x, *params], do)]
    x64 = x.detach().cpu().double().requires_grad_()
    p64 = [p.detach().cpu().double().requires_grad_() for p in params]
    want = mixer_reference(x64, *p64, lb.cpu().double(), cfg.num_heads, ("forward", "reverse"))
    want = [want, *torch.autograd.grad(want, [x64, *p64], do.cpu().double())]
    for name, g, w in zip(["out", "x", "q_proj", "f_proj", "i_proj", "o_proj", "g_norm"], got, want):
        assert rel_err(g, w) < tol, name


@pytest.mark.gpu
def test_classifier_compiled_bf16_cuda():
    """The classifier compiled (fullgraph) under bf16 autocast, as the examples train it, against
    eager fp32: loss and gradients to bf16 accuracy."""
    cfg = config(hidden_size=128, expand_ratio=32)
    model = randomize(HGRN2ForSequenceClassification(cfg), seed=14).cuda()
    ids = torch.randint(0, cfg.vocab_size, (4, 500), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, 400:] = 0
    labels = torch.tensor([0, 1, 2, 3], device="cuda")

    def loss_and_grads(m):
        loss = m(ids, labels=labels, attention_mask=mask).loss
        return [loss, *torch.autograd.grad(loss, list(model.parameters()))]

    want = loss_and_grads(model)
    with torch.autocast("cuda", torch.bfloat16):
        got = loss_and_grads(torch.compile(model, fullgraph=True))
    for i, (g, w) in enumerate(zip(got, want)):
        assert rel_err(g, w) < 5e-2, i

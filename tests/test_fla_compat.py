"""fla's own HGRN2ForCausalLM against ours, loaded from the same safetensors file.

Runs where flash-linear-attention and transformers are importable (the GPU machine with fla's
wheels carried, or a CPU machine with them installed); skipped elsewhere. fla's Triton-only
pieces are swapped for PyTorch equivalents so that it also runs on the CPU: swish -> silu, the
fused norm+linear -> RMSNorm (its default eps, 1e-5) then linear, and the GLA kernels -> fla's own
naive_recurrent_gla. Everything else (gating, lower bounds, block order, names) is fla's code.
"""

import pytest
import torch
import torch.nn.functional as F
from naive import rel_err

fla_layer = pytest.importorskip("fla.layers.hgrn2")
fla_mlp = pytest.importorskip("fla.modules.mlp")
fla_models = pytest.importorskip("fla.models")
from fla.ops.gla.naive import naive_recurrent_gla  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from hgrn2mini import HGRN2ForCausalLM  # noqa: E402


def _rms_norm_linear(x, norm_weight, norm_bias, linear_weight, linear_bias, residual=None, eps=1e-5, **_):
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * norm_weight.float()
    return F.linear(y.to(linear_weight.dtype), linear_weight, linear_bias)


def _gla(q, k, v, g=None, gk=None, initial_state=None, output_final_state=False, **_):
    return naive_recurrent_gla(q, k, v, gk if gk is not None else g, initial_state, output_final_state)


@pytest.fixture
def pytorch_fla(monkeypatch):
    monkeypatch.setattr(fla_layer, "swish", F.silu)
    monkeypatch.setattr(fla_layer, "rms_norm_linear", _rms_norm_linear)
    for name in ("chunk_gla", "fused_recurrent_gla", "fused_chunk_gla"):
        monkeypatch.setattr(fla_layer, name, _gla)
    monkeypatch.setattr(fla_mlp, "swiglu", lambda gate, y: F.silu(gate) * y)


@pytest.mark.parametrize("tied", [False, True])
def test_fla_checkpoint_gives_fla_logits(pytorch_fla, tmp_path, tied):
    torch.manual_seed(0)
    cfg = fla_models.HGRN2Config(
        hidden_size=64, num_hidden_layers=3, expand_ratio=16, vocab_size=97, tie_word_embeddings=tied,
        fuse_norm=False, fuse_swiglu=False, fuse_cross_entropy=False,
    )
    fla = fla_models.HGRN2ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # every weight random, lower bounds too, forget logits pushed to +-20
        for name, p in fla.named_parameters():
            if "lower_bounds" in name:
                p.normal_()
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "f_proj" in name:
                p.mul_(20)
    fla.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in fla.state_dict().items()}
    if tied:
        state.pop("lm_head.weight", None)
    save_file(state, tmp_path / "model.safetensors")

    ours = HGRN2ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (2, 100))
    with torch.no_grad():
        assert rel_err(ours(ids).logits, fla(input_ids=ids).logits) <= 1e-5

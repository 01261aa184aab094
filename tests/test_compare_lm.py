"""examples/compare_lm.py and its Transformer on CPU: a tiny comparison of the three models, equal
sizes, a causal Transformer, the default corpus's sample, and clear errors for bad arguments."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_lm  # noqa: E402
import data  # noqa: E402
from test_train import write_corpus  # noqa: E402
from transformer import TransformerConfig, TransformerForCausalLM  # noqa: E402

from hgrn2mini import HGRN2Config, HGRN2ForCausalLM  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def tiny(corpus: Path, out: Path, *extra: str, steps: str = "4") -> list[str]:
    return ["--data", str(corpus), "--cache-dir", str(out / "cache"), "--out", str(out), "--hidden-size", "32",
            "--layers", "1", "--expand-ratio", "16", "--head-dim", "16", "--vocab-size", "300", "--seq-len", "32",
            "--batch-size", "4", "--evals", "2", "--eval-tokens", "128", "--device", "cpu",
            *(["--steps", steps] if steps else []), *extra]


def test_three_models_same_tokens_same_size(corpus, tmp_path, capsys):
    assert compare_lm.main(tiny(corpus, tmp_path)) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    models = {m["model"]: m for m in result["models"]}
    assert list(models) == list(compare_lm.MODELS)
    assert len({(m["steps"], m["tokens"]) for m in models.values()}) == 1  # the same tokens for all
    params = [m["params"] for m in models.values()]
    assert max(params) / min(params) - 1 <= 0.05
    for name, m in models.items():
        assert math.isfinite(m["val_ppl"]) and m["tok_per_s"] > 0 and m["stopped_by"] is None
        assert [t for t, _ in m["curve"]] == [2 * 4 * 32, 4 * 4 * 32]  # validation at steps 2 and 4, in tokens
        assert (tmp_path / name / "loss.png").read_bytes()[:8] == PNG
    assert (tmp_path / "perplexity.png").read_bytes()[:8] == PNG
    table = (tmp_path / "results.md").read_text()
    assert "| HGRN1 (HGRN2, K=1) |" in table and "unigram baseline" in table and "| epochs |" in table
    assert "| Transformer (LLaMA-style) |" in capsys.readouterr().out


def test_too_small_a_time_budget_is_an_error(corpus, tmp_path, capsys):
    """Without --steps, the steps come from timing each model against --time-budget."""
    with pytest.raises(SystemExit):
        compare_lm.main(tiny(corpus, tmp_path, "--time-budget", "0.5", steps=""))
    assert "--time-budget 0.5 s leaves 0 steps per model" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--expand-ratio", "7"], "--hidden-size (32) must be divisible by --expand-ratio (7)"),
    (["--head-dim", "3"], "--hidden-size (32) must be divisible by --head-dim (3)"),
    (["--models", "hgrn2,rwkv"], "--models: unknown name(s) ['rwkv']"),
    (["--batch-size", "6", "--micro-batch-size", "4"], "--batch-size (6) must be a multiple of --micro-batch-size (4)"),
    (["--evals", "0"], "--evals must be >= 1, got 0"),
])
def test_bad_arguments_name_the_argument(corpus, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        compare_lm.main(tiny(corpus, tmp_path, *extra))
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_transformer_has_hgrn2s_parameter_count_but_the_lower_bounds_and_output_norms():
    D, L, V = 64, 3, 100
    t = TransformerForCausalLM(TransformerConfig(V, D, L, num_heads=4))
    h = HGRN2ForCausalLM(HGRN2Config(vocab_size=V, hidden_size=D, num_hidden_layers=L, expand_ratio=16))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(h) - count(t) == 2 * L * D  # lower bounds [L, D], g_norm [D] per layer


def test_transformer_is_causal_and_its_loss_is_shifted_cross_entropy():
    torch.manual_seed(0)
    model = TransformerForCausalLM(TransformerConfig(50, 32, 2, num_heads=2)).eval()
    x = torch.randint(0, 50, (2, 12))
    y = x.clone()
    y[:, 7:] = torch.randint(0, 50, (2, 5))  # the future changes
    out_x, out_y = model(x, labels=x), model(y)
    assert torch.allclose(out_x.logits[:, :7], out_y.logits[:, :7], atol=1e-5)
    assert not torch.allclose(out_x.logits[:, 7:], out_y.logits[:, 7:], atol=1e-3)
    want = torch.nn.functional.cross_entropy(out_x.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    assert torch.allclose(out_x.loss, want, rtol=1e-5)


def test_site_packages_sample_is_seeded_and_capped():
    cap = 2 << 20
    a, b = data.site_packages_files(cap, seed=0), data.site_packages_files(cap, seed=0)
    assert a == b and a and all(f.suffix == ".py" for f in a)
    assert sum(f.stat().st_size for f in a) <= cap
    assert data.site_packages_files(cap, seed=1) != a


@pytest.mark.gpu
def test_time_budget_sets_one_step_count_on_the_gpu(corpus, tmp_path):
    """Without --steps: every model timed, then all three train the same number of steps, bf16 on
    CUDA (HGRN2 at K = 16 on the Triton path, K = 1 on the PyTorch path, SDPA)."""
    args = [a if a != "cpu" else "cuda" for a in tiny(corpus, tmp_path, "--hidden-size", "64", "--time-budget", "40",
                                                        steps="")]
    assert compare_lm.main(args) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    steps = {m["steps"] for m in result["models"]}
    assert len(steps) == 1 and steps.pop() >= 10
    assert all(m["stopped_by"] is None and math.isfinite(m["val_ppl"]) for m in result["models"])
    assert result["meta"]["wall_s"] < 40 * 1.3

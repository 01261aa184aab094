"""examples/mqar.py on CPU: the task's examples against their definition, the loss on the answers
only, a tiny sweep in one process and in two worker processes, and clear errors for bad arguments."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import mqar  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@st.composite
def tasks(draw):
    pairs = draw(st.integers(1, 12))
    seq_len = draw(st.integers(4 * pairs, 4 * pairs + 40))
    vocab = 2 * draw(st.integers(pairs + 1, pairs + 30)) + draw(st.integers(0, 1))  # few spare keys: collisions likely
    return draw(st.integers(1, 6)), seq_len, pairs, vocab, draw(st.integers(0, 2**31))


@given(tasks())
def test_examples_are_well_formed(task):
    n, seq_len, pairs, vocab, seed = task
    batch = mqar.mqar_batch(n, seq_len, pairs, vocab, torch.Generator().manual_seed(seed))
    half = vocab // 2
    assert batch.inputs.shape == (n, seq_len) and batch.query_pos.shape == batch.answers.shape == (n, pairs)
    target = mqar.labels(batch)
    for x, pos, ans, lab in zip(batch.inputs.tolist(), batch.query_pos.tolist(), batch.answers.tolist(),
                                target.tolist()):
        keys, values = x[0 : 2 * pairs : 2], x[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and all(1 <= k < half for k in keys)  # unique keys, lower half
        assert all(half <= v < vocab for v in values)
        value_of = dict(zip(keys, values))
        # Every key is asked exactly once, after the pairs, and its answer is its value here.
        assert len(set(pos)) == pairs and all(p >= 2 * pairs for p in pos)
        assert sorted(x[p] for p in pos) == sorted(keys)
        assert all(value_of[x[p]] == a for p, a in zip(pos, ans))
        # Elsewhere after the pairs: the filler token.
        assert all(t == 0 for i, t in enumerate(x) if i >= 2 * pairs and i not in pos)
        # The loss mask: exactly the query positions, with the answers as targets.
        assert [i for i, t in enumerate(lab) if t != -100] == sorted(pos)
        assert all(lab[p] == a for p, a in zip(pos, ans))


def test_examples_follow_the_seed_and_held_out_differs():
    make = lambda seed: mqar.mqar_batch(8, 64, 4, 512, torch.Generator().manual_seed(seed))  # noqa: E731
    a, b = make(3), make(3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    train_seed = mqar.data_seed(0, 64, 4, held_out=False)
    assert train_seed != mqar.data_seed(0, 64, 4, held_out=True)
    assert not torch.equal(make(train_seed).inputs, make(mqar.data_seed(0, 64, 4, held_out=True)).inputs)


def test_loss_reaches_the_answer_positions_only():
    batch = mqar.mqar_batch(3, 40, 5, 64, torch.Generator().manual_seed(0))
    hidden = torch.randn(3, 40, 8, requires_grad=True)

    class Probe(torch.nn.Module):  # hidden states as a leaf: their gradient shows where the loss looks
        def __init__(self):
            super().__init__()
            self.model = lambda ids: (hidden, None)
            self.lm_head = torch.nn.Linear(8, 64)

    mqar.mqar_loss(mqar.answer_logits(Probe(), batch), batch).backward()
    touched = hidden.grad.abs().sum(-1) != 0
    assert torch.equal(touched, mqar.labels(batch) != -100)


def tiny(out: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--d-models", "32", "--settings", "16:2,24:3", "--vocab-size", "64", "--lrs",
            "1e-3,3e-3", "--steps", "2", "--batch-tokens", "96", "--eval-examples", "10", "--device", "cpu", *extra]


def test_tiny_sweep_writes_table_json_and_plot(tmp_path, capsys):
    assert mqar.main(tiny(tmp_path, "--lrs", "3e-3")) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    runs = result["runs"]
    assert len(runs) == 4 * 2 == result["meta"]["runs_expected"]  # models x settings
    assert {r["model"] for r in runs} == set(mqar.MODELS)
    assert {r["expand_ratio"] for r in runs} == {1, 16, 32, None}  # hgrn2-kmax: min(d_model, 128)
    assert all(0 <= r["accuracy"] <= 1 and r["steps"] == 2 for r in runs)
    assert {(r["seq_len"], r["examples"]) for r in runs} == {(16, 2 * 6), (24, 2 * 4)}  # 96 tokens a step
    assert all(torch.isfinite(torch.tensor(r["final_loss"])) for r in runs)
    assert len(result["best"]) == 4 * 2
    table = (tmp_path / "results.md").read_text()
    assert "| HGRN2, K=16 | 32 | 16 |" in table and "T=24, N=3" in table
    assert table.split("\n", 2)[2] in capsys.readouterr().out
    assert (tmp_path / "mqar.png").read_bytes()[:8] == PNG


def test_worker_processes_share_the_grid(tmp_path):
    args = tiny(tmp_path, "--models", "hgrn2-k16,attention", "--settings", "16:2", "--jobs", "2")
    assert mqar.main(args) == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert sorted((r["model"], r["lr"]) for r in runs) == [("attention", 1e-3), ("attention", 3e-3),
                                                            ("hgrn2-k16", 1e-3), ("hgrn2-k16", 3e-3)]
    assert len(list((tmp_path / "parts").glob("worker-*.jsonl"))) == 2
    best = json.loads((tmp_path / "results.json").read_text())["best"]
    assert len(best) == 2
    for b in best:  # the best of the lr sweep
        assert b["accuracy"] == max(r["accuracy"] for r in runs if r["model"] == b["model"])


@pytest.mark.parametrize("extra, message", [
    (["--settings", "16:8"], "--settings: 16:8: need pairs >= 1 and seq_len >= 4 * pairs"),
    (["--settings", "16x2"], "--settings: expected SEQ_LEN:PAIRS"),
    (["--d-models", "24"], "--d-models: 24 is not divisible by hgrn2-k16's expand ratio 16"),
    (["--d-models", "0"], "--d-models: expected positive integers"),
    (["--vocab-size", "6"], "--vocab-size 6 has 2 keys, fewer than the 3 pairs"),
    (["--lrs", "0.1,x"], "--lrs: expected comma-separated numbers"),
    (["--models", "mamba"], "--models: unknown name(s) ['mamba']"),
    (["--jobs", "0"], "--jobs must be >= 1, got 0"),
    (["--time-budget", "0"], "--time-budget must be > 0 seconds, got 0.0"),
    (["--batch-tokens", "20"], "--batch-tokens must be >= the longest sequence of --settings (24), got 20"),
])
def test_bad_arguments_name_the_argument(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        mqar.main(tiny(tmp_path, *extra))
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.gpu
def test_every_model_trains_on_the_gpu(tmp_path):
    """bf16 on CUDA in two worker processes: the Triton path (K = 16 and 64), the PyTorch path
    (K = 1) and SDPA, at the shortest and the longest default setting."""
    args = ["--out", str(tmp_path), "--d-models", "64", "--settings", "64:4,512:64", "--lrs", "3e-3", "--steps", "30",
            "--eval-examples", "200", "--device", "cuda", "--jobs", "2", "--time-budget", "300"]
    assert mqar.main(args) == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert len(runs) == 4 * 2
    assert all(r["steps"] == 30 and math.isfinite(r["final_loss"]) and 0 <= r["accuracy"] <= 1 for r in runs)
    assert all(r["captured"] for r in runs), [r["capture_error"] for r in runs]  # examples/graphstep.py


@pytest.mark.parametrize("tie", [True, False])
def test_models_share_width_depth_and_the_tied_head(tie):
    args = mqar.parse_args(["--d-models", "32", "--device", "cpu"] + ([] if tie else ["--no-tie-embeddings"]))
    for name in mqar.MODELS:
        model = mqar.build_model(name, 32, args)
        assert model.model.embeddings.weight.shape == (8192, 32) and len(model.model.layers) == 2
        assert (model.lm_head.weight is model.model.embeddings.weight) == tie

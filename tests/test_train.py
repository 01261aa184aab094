"""The training example (examples/train.py and its modules), on CPU with tiny runs.

Exact resume, checkpoints that survive a kill mid-write, torchrun with 2 gloo ranks against one
process, clear errors for bad --data, and the data pipeline's pieces against hand computations.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import checkpoints  # noqa: E402
import data  # noqa: E402
import generate  # noqa: E402
import train  # noqa: E402

from hgrn2mini import HGRN2Config, HGRN2ForCausalLM  # noqa: E402

WORDS = "the a cat dog sat ran on under mat log and then quickly slowly big small red blue".split()


def write_corpus(directory: Path, n_files: int = 12, lines: int = 60, seed: int = 0) -> Path:
    """Small text files of seeded pseudo-sentences: enough structure for a loss to fall."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        text = "\n".join(" ".join(rng.choice(WORDS, size=rng.integers(4, 10))) + "." for _ in range(lines))
        (directory / f"doc{i:02d}.txt").write_text(text + "\n")
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_args(corpus: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(corpus), "--cache-dir", str(cache), "--out-dir", str(out),
        "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4", "--micro-batch-size", "2",
        "--steps", "6", "--warmup", "2", "--eval-every", "3", "--ckpt-every", "2", "--eval-tokens", "256",
        "--sample-tokens", "8", "--device", "cpu", *extra,
    ]  # fmt: skip


def records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return HGRN2ForCausalLM.from_pretrained(directory).state_dict()


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(corpus, cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    assert train.main(tiny_args(corpus, cache, out)) == 0
    return out


def test_run_trains_and_reports(full_run, capsys):
    losses = [r["loss"] for r in records(full_run, "train")]
    assert [r["step"] for r in records(full_run, "train")] == list(range(1, 7))
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    final = records(full_run, "final")[0]
    assert final["val_ppl"] == pytest.approx(math.exp(records(full_run, "eval")[-1]["val_loss"]))
    assert checkpoints.latest(full_run).name == "step-000006"
    assert (full_run / "tokenizer.json").is_file() and (checkpoints.latest(full_run) / "tokenizer.json").is_file()
    assert (full_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the loss plot beside metrics.jsonl


@pytest.mark.parametrize("script", ["train", "mqar", "compare_lm"])
def test_every_help_entry_shows_its_default(script):
    module = __import__(script)
    parser = module.build_parser()
    formatter = train.HelpFormatter(parser.prog)
    for action in parser._actions:
        if action.dest == "help" or action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"{script}.py: {action.option_strings} has no help"
        assert "(default" in formatter._get_help_string(action), f"{script}.py: {action.option_strings}"


def test_stopped_and_resumed_run_matches_uninterrupted(full_run, corpus, cache, tmp_path):
    out = tmp_path / "resumed"
    assert train.main(tiny_args(corpus, cache, out, "--stop-at-step", "3")) == 0
    assert checkpoints.latest(out).name == "step-000003"
    assert train.main(tiny_args(corpus, cache, out, "--resume")) == 0
    # fp32 on CPU: bit-identical, step for step, and one metrics line per step after the resume.
    for kind, key in (("train", "loss"), ("eval", "val_loss")):
        want = [(r["step"], r[key]) for r in records(full_run, kind)]
        assert [(r["step"], r[key]) for r in records(out, kind)] == want
    a, b = weights(checkpoints.latest(full_run)), weights(checkpoints.latest(out))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_a_checkpoint_of_the_logits_loss_head(full_run, corpus, cache, tmp_path):
    """A checkpoint whose config.json has fuse_linear_cross_entropy false (written before the
    example trained with the fused head, or by fla) resumes, exactly, with the fused head."""
    out = tmp_path / "resumed"
    assert train.main(tiny_args(corpus, cache, out, "--stop-at-step", "3")) == 0
    config_path = checkpoints.latest(out) / "config.json"
    config = json.loads(config_path.read_text())
    assert config["fuse_linear_cross_entropy"] is True
    config_path.write_text(json.dumps({**config, "fuse_linear_cross_entropy": False}))
    assert train.main(tiny_args(corpus, cache, out, "--resume")) == 0
    want = [(r["step"], r["loss"]) for r in records(full_run, "train")]
    assert [(r["step"], r["loss"]) for r in records(out, "train")] == want


def test_regional_compile_trains_like_eager(full_run, corpus, cache, tmp_path):
    """--compile regions (each block compiled on its own, in place): same losses as the eager run
    to fp32 rounding, and evaluation and the final sample run through the compiled blocks."""
    torch._dynamo.reset()
    out = tmp_path / "regions"
    try:
        assert train.main(tiny_args(corpus, cache, out, "--compile", "regions")) == 0
    finally:
        torch._dynamo.reset()
    for kind, key in (("train", "loss"), ("eval", "val_loss")):
        want = [(r["step"], r[key]) for r in records(full_run, kind)]
        got = [(r["step"], r[key]) for r in records(out, kind)]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert all(abs(g - w) <= 1e-4 * abs(w) for (_, g), (_, w) in zip(got, want)), (got, want)


def test_resume_refuses_changed_settings(full_run, corpus, cache, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(corpus, cache, full_run, "--resume", "--lr", "0.01"))
    assert e.value.code == 2
    assert f"--lr was {train.PRESETS['tiny']['lr']!r}, got 0.01" in capsys.readouterr().err


def test_resume_without_checkpoint_is_an_error(corpus, cache, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(tiny_args(corpus, cache, tmp_path / "empty", "--resume"))
    assert "--resume: no checkpoint in --out-dir" in capsys.readouterr().err


def test_sigterm_stops_with_checkpoint_and_resumes_exactly(full_run, corpus, cache, tmp_path):
    out = tmp_path / "signalled"
    cmd = [sys.executable, str(EXAMPLES / "train.py"), *tiny_args(corpus, cache, out, "--ckpt-every", "100")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # signal once the first step is logged: mid-run, not before
            if (out / "metrics.jsonl").is_file() and records(out, "train"):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in err
    stopped = int(checkpoints.latest(out).name.split("-")[1])
    assert 1 <= stopped < 6  # periodic checkpoints are off: this one came from the signal
    assert train.main(tiny_args(corpus, cache, out, "--ckpt-every", "100", "--resume")) == 0
    assert [r["loss"] for r in records(out, "train")] == [r["loss"] for r in records(full_run, "train")]


# ---------------------------------------------------------------------------------------------
# Checkpoints interrupted mid-write
# ---------------------------------------------------------------------------------------------

KILLER = textwrap.dedent(
    """
    import io, os, signal, sys
    import safetensors.torch
    import torch
    sys.path.insert(0, {examples!r})
    import checkpoints
    import hgrn2mini.checkpoint
    from hgrn2mini import HGRN2Config, HGRN2ForCausalLM

    out, point = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = HGRN2ForCausalLM(HGRN2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, expand_ratio=16))
    checkpoints.save(out, 1, model, "{{}}", {{"step": 1}})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def half_then_die(write_full, path):  # half of the real bytes reach the disk, then SIGKILL
        buf = io.BytesIO()
        write_full(buf)
        with open(path, "wb") as f:
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
        die()

    if point == "weights":
        hgrn2mini.checkpoint.save_file = lambda t, path, metadata=None: half_then_die(
            lambda b: b.write(safetensors.torch.save(t, metadata=metadata)), path)
    elif point == "state":
        real_save = torch.save
        torch.save = lambda obj, path: half_then_die(lambda b: real_save(obj, b), path)
    elif point == "pointer":  # the new directory is complete and renamed; `latest` not yet moved
        real_write = checkpoints.atomic_write_bytes
        checkpoints.atomic_write_bytes = lambda path, b: die() if path.name == "latest" else real_write(path, b)
    checkpoints.save(out, 2, model, "{{}}", {{"step": 2}})
    print("not killed")
    """
)


@pytest.mark.parametrize("point", ["weights", "state", "pointer"])
def test_checkpoint_killed_mid_write_leaves_previous_loadable(tmp_path, point):
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(examples=str(EXAMPLES)))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(script), str(out), point], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    previous = checkpoints.latest(out)
    assert previous.name == "step-000001"
    assert checkpoints.load_state(previous) == {"step": 1}
    torch.manual_seed(0)
    want = HGRN2ForCausalLM(HGRN2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, expand_ratio=16))
    got = weights(previous)
    assert all(torch.equal(got[k], v) for k, v in want.state_dict().items())
    # The next save cleans up after the killed one.
    checkpoints.save(out, 3, want, "{}", {"step": 3})
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step-000003"]


# ---------------------------------------------------------------------------------------------
# torchrun: 2 gloo ranks against 1 process, same global batch
# ---------------------------------------------------------------------------------------------


def test_torchrun_two_ranks_match_one_process(full_run, corpus, cache, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(EXAMPLES / "train.py"), *tiny_args(corpus, cache, out)]
    # One micro-batch per rank here against two accumulated ones in the single process.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert records(out, "config")[0]["world"] == 2
    assert records(out, "final")[0]["ranks_weights_identical"] is True
    # Same math, different summation order: equal to float32 rounding, not bit for bit.
    for kind, key in (("train", "loss"), ("eval", "val_loss")):
        one = [r[key] for r in records(full_run, kind)]
        two = [r[key] for r in records(out, kind)]
        assert two == pytest.approx(one, rel=1e-4)
    a, b = weights(checkpoints.latest(full_run)), weights(checkpoints.latest(out))
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)


# ---------------------------------------------------------------------------------------------
# Bad --data: a clear error before training starts
# ---------------------------------------------------------------------------------------------


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "empty").mkdir()
    (tmp / "blob.txt").write_bytes(b"text then \x00\x01\x02 binary")
    (tmp / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    (tmp / "nokey.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    return {
        "missing": ([str(tmp / "nope")], f"--data: path {str(tmp / 'nope')!r} does not exist"),
        "empty folder": ([str(tmp / "empty")], "contains no .txt or .jsonl files"),
        "binary": ([str(tmp / "blob.txt")], "looks binary (NUL byte at offset 10)"),
        "not utf-8": ([str(tmp / "latin1.txt")], "is not UTF-8 text: byte 0xe9 at offset 3"),
        "invalid jsonl": ([str(tmp / "bad.jsonl")], "bad.jsonl:2 is not valid JSON"),
        "jsonl without text": ([str(tmp / "nokey.jsonl")],
                               "nokey.jsonl:2: expected an object with a string field 'text'"),
    }  # fmt: skip


@pytest.mark.parametrize("case", ["missing", "empty folder", "binary", "not utf-8", "invalid jsonl",
                                  "jsonl without text"])
def test_bad_data_fails_before_training(case, tmp_path, capsys):
    data_args, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    argv = ["--data", *data_args, "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(out), "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing was trained or written


def test_too_little_validation_data_is_an_error(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c", n_files=3, lines=2)
    with pytest.raises(SystemExit):
        train.main(tiny_args(corpus, tmp_path / "cache", tmp_path / "out", "--seq-len", "4096"))
    assert "fewer than one sequence of --seq-len 4096" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Data pipeline pieces
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(corpus):
    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    return data.train_tokenizer(texts, 300)


@given(st.text(max_size=200))
@example("a document that mentions <|endoftext|> keeps it")  # found by hypothesis: special-token matching
@example("\r\n\t  café ✓ 数据 🐍 \x00")
def test_tokenizer_round_trips_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_tokenizer_round_trips_through_its_file(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(tokenizer.to_str())
    loaded = data.load_tokenizer(path)
    text = "the cat sat.\n\tcafé ✓ 数据 🐍 \x00\r\n"
    assert loaded.encode(text).ids == tokenizer.encode(text).ids
    assert loaded.decode(loaded.encode(text).ids) == text
    assert tokenizer.get_vocab_size() == 300 and tokenizer.token_to_id(data.EOT) is not None


def test_split_is_seeded_disjoint_and_complete():
    docs = [data.Document(str(i), f"text {i}") for i in range(40)]
    train_a, val_a = data.split_documents(docs, 0.1, seed=1)
    train_b, val_b = data.split_documents(docs, 0.1, seed=1)
    assert (train_a, val_a) == (train_b, val_b)
    assert len(val_a) == 4 and sorted(d.name for d in train_a + val_a) == sorted(d.name for d in docs)
    assert data.split_documents(docs, 0.1, seed=2)[1] != val_a


def test_long_documents_are_cut_at_lines():
    text = "".join(f"line {i}\n" for i in range(1000))
    pieces = data._pieces(data.Document("d", text), 100)
    assert "".join(p.text for p in pieces) == text
    assert all(len(p.text) <= 100 and p.text.endswith("\n") for p in pieces)


def test_batches_cover_each_epoch_once_and_shards_partition_them():
    seqs = np.arange(10 * 3).reshape(10, 3)
    batches = data.PackedBatches(seqs, batch_size=4, seed=0)
    first_two_epochs = np.concatenate([batches.global_batch(s) for s in range(5)])  # 20 sequences
    for epoch in (first_two_epochs[:10], first_two_epochs[10:]):
        assert sorted(epoch[:, 0].tolist()) == list(range(0, 30, 3))
    assert not np.array_equal(first_two_epochs[:10], first_two_epochs[10:])  # reshuffled per epoch
    assert np.array_equal(data.PackedBatches(seqs, 4, 0).global_batch(3), batches.global_batch(3))
    g = batches.global_batch(7)
    assert np.array_equal(np.concatenate([data.shard(g, r, 2) for r in range(2)]), g)


def test_unigram_perplexity_by_hand():
    # counts 0:2, 1:1, 2:0 over 3 tokens; add-one over V=3: p0 = 3/6, p1 = 2/6.
    ppl = data.unigram_perplexity(np.array([0, 0, 1]), np.array([0, 1]), vocab_size=3)
    assert ppl == pytest.approx(math.exp(-(math.log(3 / 6) + math.log(2 / 6)) / 2))


def test_default_corpus_is_the_stdlib_without_tests_or_packages():
    files = data.stdlib_files()
    assert len(files) > 100 and files == sorted(files, key=lambda p: str(p))
    parts = {part for f in files for part in f.parts}
    assert not parts & {"site-packages", "dist-packages", "test", "tests"}
    assert any(f.name == "argparse.py" for f in files)


def test_jsonl_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    docs = data.read_documents([str(tmp_path)])
    assert [(d.name.rsplit(":", 1)[1], d.text) for d in docs] == [("1", "one"), ("3", "two")]


# ---------------------------------------------------------------------------------------------
# Optimizer groups and schedules
# ---------------------------------------------------------------------------------------------


def test_weight_decay_on_linear_weights_only():
    model = HGRN2ForCausalLM(HGRN2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, expand_ratio=16))
    decay, no_decay = train.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {names[id(p)] for p in decay["params"]} == linear_weights
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert {"model.lower_bounds", "model.embeddings.weight", "model.norm.weight"} <= not_decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))

    tied = HGRN2ForCausalLM(HGRN2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, expand_ratio=16,
                                        tie_word_embeddings=True))
    decay, _ = train.param_groups(tied, 0.1)
    assert all(p is not tied.model.embeddings.weight for p in decay["params"])


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_lr_schedules(schedule):
    _, args = train.parse_args(["--steps", "100", "--warmup", "10", "--schedule", schedule, "--min-lr-ratio", "0.1"])
    f = train.lr_schedule(args)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(10) == pytest.approx(1.0)
    assert f(99) == pytest.approx(0.1, abs=0.01)
    values = [f(s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # never rises after warm-up
    if schedule == "wsd":
        assert f(79) == 1.0 and f(80) < 1.0  # stable until the last 20%, then decays


# ---------------------------------------------------------------------------------------------
# generate.py
# ---------------------------------------------------------------------------------------------


def test_generate_streams_the_models_greedy_tokens(full_run, capsys):
    assert generate.main([str(full_run), "--prompt", "the cat", "--max-new-tokens", "12",
                          "--temperature", "0", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    directory = checkpoints.latest(full_run)
    model = HGRN2ForCausalLM.from_pretrained(directory).eval()
    tok = data.load_tokenizer(directory / "tokenizer.json")
    ids = torch.tensor([tok.encode("the cat").ids])
    new = [int(t) for t in model.generate(ids, 12, temperature=0)]
    eot = tok.token_to_id(data.EOT)
    new = new[: new.index(eot)] if eot in new else new
    assert printed == "the cat" + tok.decode(new) + "\n"


def test_generate_explains_a_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate.main([str(tmp_path)])
    assert "must be a directory with config.json" in capsys.readouterr().err

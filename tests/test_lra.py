"""examples/lra.py and examples/image.py: the generators' examples are well formed (ListOps
answers against an evaluator written here, Pathfinder labels against a flood fill of the image),
a few training steps of each run on tiny settings, the time budget holds, bad arguments fail."""

import json
import re
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import image  # noqa: E402
import lra  # noqa: E402

# ----------------------------------------------------------------------------------------------
# ListOps
# ----------------------------------------------------------------------------------------------


def evaluate(tokens: list[str]) -> int:
    """ListOps by a stack, left to right: an operator opens a frame, ']' closes it."""
    stack: list[tuple[str, list[int]]] = [("", [])]
    for t in tokens:
        if t.startswith("["):
            stack.append((t, []))
        elif t == "]":
            op, args = stack.pop()
            s = sorted(args)
            value = {"[MIN": s[0], "[MAX": s[-1], "[SM": sum(s) % 10,
                     "[MED": s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) // 2}[op]
            stack[-1][1].append(value)
        else:
            stack[-1][1].append(int(t))
    (_, (value,)), = stack  # one expression, fully closed
    return value


def test_listops_examples_are_well_formed():
    ids, lengths, labels = lra.listops_chunk(seed=3, split=0, chunk=0, n=60, min_len=20, max_len=300)
    seen_ops = set()
    for row, n, label in zip(ids, lengths, labels):
        assert 20 < n < 300 and (row[n:] == 0).all() and (row[:n] > 0).all()
        tokens = [lra.VOCAB[i] for i in row[:n]]
        depth = max_depth = 0
        for t in tokens:
            depth += t.startswith("[") - (t == "]")
            max_depth = max(max_depth, depth)
            assert depth >= 0
            if t.startswith("["):
                seen_ops.add(t)
        assert depth == 0 and 1 <= max_depth <= 9  # operators above depth 10 only: leaves there
        assert evaluate(tokens) == label
    assert seen_ops == set(lra.OPS)
    assert len(set(labels.tolist())) >= 5


def test_listops_evaluator_on_known_expressions():
    assert evaluate("[MAX 2 9 [MIN 4 7 ] 0 ]".split()) == 9
    assert evaluate("[MED 1 8 3 6 ]".split()) == 4  # (3 + 6) // 2
    assert evaluate("[SM 7 8 [MED 1 2 9 ] ]".split()) == 7


def test_generation_does_not_depend_on_the_chunking():
    a = lra.listops_chunk(seed=1, split=1, chunk=2, n=4, min_len=10, max_len=80)
    b = lra.listops_chunk(seed=1, split=1, chunk=2, n=4, min_len=10, max_len=80)
    c = lra.listops_chunk(seed=1, split=0, chunk=2, n=4, min_len=10, max_len=80)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])  # train and test differ


# ----------------------------------------------------------------------------------------------
# Pathfinder
# ----------------------------------------------------------------------------------------------


def components(mask: np.ndarray, radius: int) -> np.ndarray:
    """Labels of the connected components of mask's pixels, neighbours within Chebyshev `radius`."""
    out = np.zeros(mask.shape, int)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if out[start]:
            continue
        count += 1
        out[start] = count
        todo = deque([start])
        while todo:
            r, c = todo.popleft()
            for dr in range(-radius, radius + 1):
                for dc in range(-radius, radius + 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not out[rr, cc]:
                        out[rr, cc] = count
                        todo.append((rr, cc))
    return out


def test_pathfinder_labels_equal_a_flood_fill():
    ids, lengths, labels = lra.pathfinder_chunk(seed=5, split=0, chunk=0, n=40, size=32)
    assert (lengths == 1024).all() and set(np.unique(ids)) == {0, 1, 2}
    for row, label in zip(ids, labels):
        img = row.reshape(32, 32)
        dots = components(img == 2, radius=1)
        assert dots.max() == 2 and (img == 2).sum() == 10  # two plus-shaped dots
        # Dashes leave gaps of one pixel: bridge them (radius 2); curves keep more than 3 apart.
        curves = components(img > 0, radius=2)
        joined = len(set(curves[dots > 0].tolist())) == 1
        assert joined == bool(label)
        assert curves.max() == 3  # three curves, each one piece, none touching another
    assert 0.2 < labels.mean() < 0.8


# ----------------------------------------------------------------------------------------------
# Runs on tiny settings, the budget, bad arguments
# ----------------------------------------------------------------------------------------------

TINY = ["--width", "32", "--layers", "1", "--expand-ratio", "16", "--batch-size", "4", "--device", "cpu"]


def test_lra_trains_a_few_steps(tmp_path):
    lra.main(["--out", str(tmp_path), "--jobs", "1", "--max-steps", "2", "--time-budget", "600",
              "--listops-train", "8", "--listops-test", "6", "--listops-min-len", "10", "--listops-max-len", "70",
              "--pathfinder-train", "8", "--pathfinder-test", "6", *TINY])
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["task"], r["model"]) for r in runs] == [(t, m) for t in lra.TASKS for m in lra.seqcls.MODELS]
    for r in runs:
        assert r["steps"] == 2 and r["test_examples"] == 6 and 0 <= r["test_accuracy"] <= 1
        assert np.isfinite(r["final_train_loss"])
    assert (tmp_path / "results.png").stat().st_size > 0
    assert "held-out accuracy" in (tmp_path / "results.md").read_text()


def test_image_trains_a_few_steps_in_subprocesses(tmp_path):
    image.main(["--out", str(tmp_path), "--jobs", "2", "--max-steps", "2", "--time-budget", "600",
                "--models", "hgrn2", "attention", *TINY])
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["model"] for r in runs] == ["hgrn2", "attention"]
    held_out = len(np.load(tmp_path / "data_digits.npz")["test_y"])
    assert 355 <= held_out <= 365  # 20% of 1,797, class by class
    assert all(r["steps"] == 2 and r["test_examples"] == held_out for r in runs)


def test_time_budget_holds(tmp_path):
    start = time.time()
    image.main(["--out", str(tmp_path), "--jobs", "1", "--time-budget", "12", *TINY])
    elapsed = time.time() - start
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert len(runs) == 3 and all(r["steps"] >= 1 for r in runs)
    assert elapsed < 12 + 8, elapsed  # the report and one held-out batch after a deadline


@pytest.mark.parametrize("script, argv, message", [
    (lra, ["--width", "30", "--expand-ratio", "16"], r"--width \(30\) must be divisible by --expand-ratio \(16\)"),
    (lra, ["--time-budget", "0"], "--time-budget must be > 0 seconds, got 0.0"),
    (lra, ["--listops-min-len", "300", "--listops-max-len", "305"], r"--listops-min-len must be >= 0 and at least 10 "
     r"below --listops-max-len .*, got 300 and 305"),
    (lra, ["--pathfinder-train", "0"], "--pathfinder-train must be >= 1, got 0"),
    (lra, ["--tasks", "cifar"], "invalid choice: 'cifar'"),
    (image, ["--test-fraction", "1.5"], r"--test-fraction must be in \(0, 1\), got 1.5"),
    (image, ["--jobs", "0"], "--jobs must be >= 1, got 0"),
    (image, ["--models", "mamba"], "invalid choice: 'mamba'"),
])
def test_bad_arguments(script, argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        script.main(["--out", str(tmp_path), *argv])
    assert re.search(message, capsys.readouterr().err)

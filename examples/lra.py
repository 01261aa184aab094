"""Two Long Range Arena tasks, generated on the fly from a seed (no download), for bidirectional
HGRN2, HGRN2 at expand_ratio 1 and a softmax-attention baseline of the same width.

    python examples/lra.py --out runs/lra                      # both tasks, three models, ~6 min on a GPU
    python examples/lra.py --tasks listops --time-budget 120 --out runs/listops

ListOps (Nangia & Bowman 2018, as LRA generates it): nested [MAX, [MIN, [MED and [SM (sum
modulo 10) expressions over the digits 0-9, between 500 and 2,000 tokens long; the answer (10 classes) is
the value of the expression. The generator follows LRA's: a node is a digit with probability
0.75 (always at depth 10), else an operator over 2 to 10 arguments; expressions outside the length
range are drawn again. Tokens: the operators, the digits and "]" (LRA's parentheses carry nothing
more and are left out).

Pathfinder-32 (Linsley et al. 2018, as in LRA): a 32 x 32 image with three dashed curves and two
dots; the class is whether one curve joins the two dots. Read as a sequence of 1,024 pixels
(0 background, 1 curve, 2 dot). Curves keep 3 pixels apart, so the label is exactly whether the
dots are connected when gaps of one pixel are bridged (what tests/test_lra.py checks).

Everything runs within --time-budget seconds of wall clock: data generation first (in parallel
processes), then the runs, --jobs at a time as subprocesses, each with an equal share of what
is left. Outputs in --out: results.md (table), results.json, results.png (training loss and
held-out accuracy), the generated data sets (data_*.npz).
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

START = time.time()  # the budget counts from here, before torch is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, however we're launched
import seqcls  # noqa: E402

TASKS = ("listops", "pathfinder")
CHUNK = 250  # examples per generation job, each seeded by (seed, split, chunk): results do not depend on --jobs

# ----------------------------------------------------------------------------------------------
# ListOps
# ----------------------------------------------------------------------------------------------

OPS = ("[MIN", "[MAX", "[MED", "[SM")
VOCAB = ("<pad>", *(str(d) for d in range(10)), *OPS, "]")  # token id = index
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}


class _TooLong(Exception):
    pass


def listops_tree(rng: np.random.Generator, max_len: int, max_depth: int = 10, max_args: int = 10):
    """One expression as tokens (a list of str) and its value, or None when longer than max_len
    (drawn again by the caller, as LRA's generator filters by length)."""
    tokens: list[str] = []

    def node(depth: int) -> int:
        if len(tokens) > max_len:
            raise _TooLong
        if depth >= max_depth or rng.random() > 0.25:  # a digit, as LRA's VALUE_P = 0.25
            value = int(rng.integers(10))
            tokens.append(str(value))
            return value
        op = OPS[rng.integers(len(OPS))]
        tokens.append(op)
        args = [node(depth + 1) for _ in range(int(rng.integers(2, max_args + 1)))]
        tokens.append("]")
        if op == "[MIN":
            return min(args)
        if op == "[MAX":
            return max(args)
        if op == "[MED":
            return int(np.median(args))  # LRA's: the mean of the two middle values, truncated
        return sum(args) % 10

    try:
        value = node(1)
    except _TooLong:
        return None
    return (tokens, value) if len(tokens) <= max_len else None


def listops_chunk(seed: int, split: int, chunk: int, n: int, min_len: int, max_len: int):
    rng = np.random.default_rng([seed, split, chunk, 0])
    ids = np.zeros((n, max_len), np.int64)
    lengths, labels = np.zeros(n, np.int64), np.zeros(n, np.int64)
    i = 0
    while i < n:
        tree = listops_tree(rng, max_len)
        if tree is None or not min_len < len(tree[0]) < max_len:  # LRA's bounds, both excluded
            continue
        tokens, value = tree
        ids[i, : len(tokens)] = [TOKEN_ID[t] for t in tokens]
        lengths[i], labels[i] = len(tokens), value
        i += 1
    return ids, lengths, labels


# ----------------------------------------------------------------------------------------------
# Pathfinder
# ----------------------------------------------------------------------------------------------


def _curve(rng, size: int, forbidden: np.ndarray, length: int):
    """A smooth 8-connected pixel walk of `length` pixels, 1 pixel from the border at least, that
    avoids `forbidden`; None after 50 failed tries."""
    for _ in range(50):
        pos = rng.uniform(2, size - 3, 2)
        angle = rng.uniform(0, 2 * np.pi)
        pixels = [tuple(np.floor(pos + 0.5).astype(int))]
        if forbidden[pixels[0]]:
            continue
        for _ in range(4 * length):
            angle += rng.normal(0, 0.3)
            pos = pos + (np.sin(angle), np.cos(angle))  # a step of at most 1 in each coordinate
            pixel = tuple(np.floor(pos + 0.5).astype(int))  # floor(x + 0.5): neighbours stay 8-connected
            if pixel == pixels[-1]:
                continue
            if not (1 <= pixel[0] <= size - 2 and 1 <= pixel[1] <= size - 2) or forbidden[pixel] or pixel in pixels:
                break
            pixels.append(pixel)
            if len(pixels) == length:
                return pixels
    return None


def pathfinder_image(rng, size: int = 32, curves: int = 3, length=(12, 24), dash: int = 3):
    """(image [size, size] of 0 / 1 curve / 2 dot, label): dots on both ends of curve 0 (label 1),
    or on an end of curve 0 and an end of curve 1 (label 0); curve 2 is a distractor. Dashes of
    `dash` pixels with 1-pixel gaps; pixels of different curves are more than 3 apart."""
    while True:
        forbidden = np.zeros((size, size), bool)
        paths = []
        for _ in range(curves):
            path = _curve(rng, size, forbidden, int(rng.integers(length[0], length[1] + 1)))
            if path is None:
                break
            paths.append(path)
            for r, c in path:
                forbidden[max(r - 3, 0) : r + 4, max(c - 3, 0) : c + 4] = True
        if len(paths) < curves:
            continue
        label = int(rng.integers(2))
        a, b = paths[0][0], (paths[0][-1] if label else paths[1][-1])
        if max(abs(a[0] - b[0]), abs(a[1] - b[1])) < 5:  # the two dots stay apart
            continue
        image = np.zeros((size, size), np.int64)
        for path in paths:
            for i, (r, c) in enumerate(path):
                if i % (dash + 1) < dash or i == len(path) - 1:
                    image[r, c] = 1
        for r, c in (a, b):  # a plus-shaped dot
            image[r, c] = image[r - 1, c] = image[r + 1, c] = image[r, c - 1] = image[r, c + 1] = 2
        return image, label


def pathfinder_chunk(seed: int, split: int, chunk: int, n: int, size: int):
    rng = np.random.default_rng([seed, split, chunk, 1])
    ids = np.zeros((n, size * size), np.int64)
    labels = np.zeros(n, np.int64)
    for i in range(n):
        image, labels[i] = pathfinder_image(rng, size)
        ids[i] = image.ravel()
    return ids, np.full(n, size * size, np.int64), labels


# ----------------------------------------------------------------------------------------------
# Data sets, runs, report
# ----------------------------------------------------------------------------------------------


def make_split(task: str, split: int, n: int, args, pool) -> tuple[np.ndarray, ...]:
    chunks = [min(CHUNK, n - i) for i in range(0, n, CHUNK)]
    if task == "listops":
        jobs = [(listops_chunk, args.seed, split, c, k, args.listops_min_len, args.listops_max_len)
                for c, k in enumerate(chunks)]
    else:
        jobs = [(pathfinder_chunk, args.seed, split, c, k, 32) for c, k in enumerate(chunks)]
    parts = list(pool.map(_call, jobs))
    return tuple(np.concatenate(p) for p in zip(*parts))


def _call(job):
    return job[0](*job[1:])


def make_data(task: str, args, out: Path, pool) -> Path:
    n_train, n_test = (args.listops_train, args.listops_test) if task == "listops" else (
        args.pathfinder_train, args.pathfinder_test)
    train = make_split(task, 0, n_train, args, pool)
    test = make_split(task, 1, n_test, args, pool)
    vocab, labels = (len(VOCAB), 10) if task == "listops" else (3, 2)
    path = out / f"data_{task}.npz"
    np.savez(path, train_ids=train[0], train_len=train[1], train_y=train[2], test_ids=test[0],
             test_len=test[1], test_y=test[2], vocab_size=vocab, num_labels=labels)
    return path


def check(args, p) -> None:
    for name in ("listops_train", "listops_test", "pathfinder_train", "pathfinder_test"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.listops_min_len < 0 or args.listops_max_len - args.listops_min_len < 10:
        p.error(f"--listops-min-len must be >= 0 and at least 10 below --listops-max-len (a narrower window "
                f"may hold no expression), got {args.listops_min_len} and {args.listops_max_len}")


def all_data(args, out: Path) -> dict[str, Path]:
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        return {task: make_data(task, args, out, pool) for task in args.tasks}


def main(argv: list[str] | None = None) -> str:
    p = seqcls.parser(__doc__, "runs/lra", 330.0, width=128, layers=4, expand_ratio=32, jobs=6)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="tasks to run")
    p.add_argument("--listops-train", type=int, default=12000, help="training expressions")
    p.add_argument("--listops-test", type=int, default=1000, help="held-out expressions")
    p.add_argument("--listops-min-len", type=int, default=500,
                   help="expressions are longer than this, tokens (LRA: 500)")
    p.add_argument("--listops-max-len", type=int, default=2000, help="and shorter than this (LRA: 2000)")
    p.add_argument("--pathfinder-train", type=int, default=20000, help="training images")
    p.add_argument("--pathfinder-test", type=int, default=2000, help="held-out images")
    return seqcls.main(p, argv, START, __file__, "Long Range Arena tasks, generated", all_data, check)


if __name__ == "__main__":
    main()

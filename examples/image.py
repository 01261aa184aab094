"""Image classification as a sequence of pixels: scikit-learn's 8 x 8 handwritten digits (1,797
images, 10 classes, shipped inside scikit-learn: no download), for bidirectional HGRN2, HGRN2 at
expand_ratio 1 and a ViT-style softmax-attention encoder (class token, learned positions) of the
same width.

    python examples/image.py --out runs/image        # ~2 min on a GPU, three models in parallel

Each image is 64 tokens, its pixels row by row; a pixel's value (0-16) is its token. The split
is stratified, --test-fraction of the images held out, fixed by --seed. Everything runs within
--time-budget seconds of wall clock, --jobs runs at a time as subprocesses. Outputs in --out:
results.md (table), results.json, results.png (training loss and held-out accuracy), data_digits.npz.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

START = time.time()  # the budget counts from here, before torch is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, however we're launched
import seqcls  # noqa: E402


def digits(seed: int, test_fraction: float, out: Path) -> Path:
    """The digits as [N, 64] pixel tokens, split by class so that every class keeps the fraction."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    ids = images.astype(np.int64)  # values 0..16
    rng = np.random.default_rng(seed)
    test = np.zeros(len(ids), bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test[members[: round(test_fraction * len(members))]] = True
    path = out / "data_digits.npz"
    lengths = np.full(len(ids), ids.shape[1], np.int64)
    np.savez(path, train_ids=ids[~test], train_len=lengths[~test], train_y=labels[~test].astype(np.int64),
             test_ids=ids[test], test_len=lengths[test], test_y=labels[test].astype(np.int64), vocab_size=17,
             num_labels=10)
    return path


def check(args, p) -> None:
    if not 0 < args.test_fraction < 1:
        p.error(f"--test-fraction must be in (0, 1), got {args.test_fraction}")


def main(argv: list[str] | None = None) -> str:
    p = seqcls.parser(__doc__, "runs/image", 110.0, width=128, layers=3, expand_ratio=32, jobs=3)
    p.add_argument("--test-fraction", type=float, default=0.2, help="images held out, per class")
    return seqcls.main(p, argv, START, __file__, "Digits (8 x 8) as pixel sequences",
                       lambda args, out: {"digits": digits(args.seed, args.test_fraction, out)}, check)


if __name__ == "__main__":
    main()

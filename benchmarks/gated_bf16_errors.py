"""How the bf16 gated op's d f_logits errs against float64, by two measures (CUDA).

    python benchmarks/gated_bf16_errors.py [seeds]     (default 12: 180 problems)

d f_logits = dg * w with w = (1 - lb) s (1 - s) / f exact and elementwise (s = sigmoid(f_logits)).
Where forget logits spread around -20, w spans e^12 and more, and the plain norm-relative error of
d f_logits is that of a few elements of dg. Prints, per problem, that plain error, the error of dg
carried through w (||(got - want) / w|| / ||want / w||, what tests/naive.py::gated_errors checks)
and the elementwise errors at the three largest reference elements; then the worst and the medians.
"""

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from naive import rel_err  # noqa: E402
from problems import Problem  # noqa: E402
from test_ops import gated_op_and_reference  # noqa: E402


def errors(p: Problem) -> tuple[float, float, list[float]]:
    got, want, scales = gated_op_and_reference(p, torch.bfloat16, "cuda")
    got, ref, w = got[3].double(), want[3], scales["df_logits"]
    top = ref.abs().flatten().argsort(descending=True)[:3]
    elementwise = ((got - ref).abs() / ref.abs()).flatten()[top].tolist()
    return rel_err(got, ref), rel_err(got / w, ref / w), elementwise


def main() -> None:
    seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    rows = []
    for seed in range(seeds):
        for shift, lb in ((-20.0, 0.5), (-20.0, 0.0), (0.0, 0.9), (20.0, 0.999), (-3.0, 0.0)):
            for T, K in ((32, 16), (130, 32), (600, 128)):
                p = Problem(B=1, T=T, H=1, K=K, V=K, gate="logits", shift=shift, lower_bound=lb,
                            with_state=seed % 2 == 0, seed=seed)
                rows.append((p, *errors(p)))
    rows.sort(key=lambda r: -r[1])
    print("worst by the plain norm:")
    for p, plain, weighted, top in rows[:8]:
        print(f"  plain {plain:.2e}  through w {weighted:.2e}  top-3 elementwise "
              f"{', '.join(f'{e:.1e}' for e in top)}  {p}")
    print(f"{len(rows)} problems: plain > 1e-2 on {sum(r[1] > 1e-2 for r in rows)}; through w max "
          f"{max(r[2] for r in rows):.2e}; medians {statistics.median(r[1] for r in rows):.2e} (plain), "
          f"{statistics.median(r[2] for r in rows):.2e} (through w)")


if __name__ == "__main__":
    main()

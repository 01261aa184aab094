"""How much of the op's time is DRAM bytes: writes versions of `kernels/chunk.py` in which the odd
chunks' loads and stores of one group of tensors go to the rows of the even chunk before them.
The instructions stay the same; the second access of each line comes from L2, so that group's DRAM
traffic halves. Outputs are wrong: only the time means anything. Then time them against the tree
with `ab_chunk.py` (device machine):

    python benchmarks/half_bytes.py            # writes benchmarks/_half_{states,g,qv,outs,all}.py
    git show HEAD:kernels/chunk.py > benchmarks/_chunk_head.py
    python -P benchmarks/ab_chunk.py benchmarks/_chunk_head.py --rounds 3 --shapes 8x2048x8 \\
        --also benchmarks/_half_states.py --also benchmarks/_half_g.py ... --also benchmarks/_half_all.py

Groups: the chunk states and their gradients (walk stores, joins, the out / dv / dq/dg loads); g
and b (gcum); q, v, do; the outputs o, dv, dq, dg. Measured 2026-11-25 (benchmarks/RESULTS.md,
fourteenth session): every group halved, 1.10x fwd+bwd at 8 x 2048 x 8.
"""

import functools
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
EVEN = ", t0 - t0 % (2 * BT), T,"  # the even chunk's first row (BT rows a chunk)

# Tile loads and stores of each group, by the pointer they start from.
CALLS = {
    "g": [r"_load_tile\(g \+ offk", r"_load_gcum\(gcum \+ offk", r"_store_tile\(gcum \+ offk, b"],
    "qv": [r"_load_tile\(q \+ offk", r"_load_tile\(v \+ offv", r"_load_tile\(do \+ offv"],
    "outs": [r"_store_tile\(o \+ offv, oc", r"_store_tile\(dq \+ offk, dqc", r"_store_tile\(dg \+ offk, dgc"],
}
# The states: stored by the walk, loaded (and joined) by the out, dv and dq/dg kernels at chunk n.
STATES = [
    (r"tl\.store\(states \+ \(bh \* NT \+ n\) \* K \* V", "tl.store(states + (bh * NT + n - n % 2) * K * V"),
    (r"st = states \+ \(bh \* NT \+ n\) \* K \* V", "st = states + (bh * NT + n - n % 2) * K * V"),
    (r"dst = dstates \+ \(bh \* NT \+ n\) \* K \* V", "dst = dstates + (bh * NT + n - n % 2) * K * V"),
]


def halve(src: str, group: str) -> str:
    if group == "states":
        for pattern, repl in STATES:
            src, n = re.subn(pattern, repl, src)
            assert n, f"no match for {pattern}: chunk.py changed, update half_bytes.py"
        return src
    for pattern in CALLS[group]:
        src, n = re.subn(pattern + r"(.*?), t0, T,", lambda m: m.group(0)[: -len(", t0, T,")] + EVEN, src)
        assert n, f"no match for {pattern}: chunk.py changed, update half_bytes.py"
    return src


GROUPS = ("states", *CALLS)


def main():
    with open(os.path.join(HERE, "..", "kernels", "chunk.py")) as f:
        src = f.read()
    versions = {group: halve(src, group) for group in GROUPS}
    versions["all"] = functools.reduce(halve, GROUPS, src)
    for group, text in versions.items():
        path = os.path.join(HERE, f"_half_{group}.py")
        with open(path, "w") as f:
            f.write(text)
        print(path)


if __name__ == "__main__":
    main()

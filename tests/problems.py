"""The tests' one input factory: a recurrence problem (`Problem`) gives the inputs of the plain
op (`inputs`) and of the gated one (`logits`), in float64, from its seed; `problems` draws them
with hypothesis, `REGIMES` names the gate regimes of fixed-shape tests.

The strategy draws the hard cases on purpose: T = 1, T not a multiple of the chunk (8 on the CPU path,
64 in Triton), gates from near 0 (forget logits down to -20, or g = -30 per step) to near 1
(logits up to +20, lower bounds up to 0.999), K != V, with and without an initial state.
"""

from dataclasses import dataclass

import torch
from hypothesis import example
from hypothesis import strategies as st
from naive import gates


@dataclass
class Problem:
    B: int
    T: int
    H: int
    K: int
    V: int
    gate: str = "logits"  # or "uniform30" (g uniform in [-30, 0]: every sub-block on the slow path)
    shift: float = 0.0  # mean forget logit
    lower_bound: float = 0.0
    with_state: bool = True
    seed: int = 0

    def inputs(self, device="cpu"):
        """float64 q, g, v, h0 (or None), do, dht on device."""
        gen = torch.Generator().manual_seed(self.seed)
        B, T, H, K, V = self.B, self.T, self.H, self.K, self.V
        rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
        q, v = rnd(B, T, H, K), rnd(B, T, H, V)
        if self.gate == "uniform30":
            g = -30 * torch.rand(B, T, H, K, generator=gen, dtype=torch.float64)
        else:
            g = gates(self.shift + 2 * rnd(B, T, H, K), self.lower_bound)
        h0 = rnd(B, H, K, V) if self.with_state else None
        do, dht = rnd(B, T, H, V), rnd(B, H, K, V)
        out = [q, g, v, h0, do, dht]
        return [x.to(device) if x is not None else None for x in out]

    def logits(self, device="cpu"):
        """The problem as the gated op takes it, float64: q logits, forget logits (mean shift;
        uniform in [-30, 0] for gate "uniform30", gates down to e^-30), a lower bound per channel up
        to lower_bound (None at 0), v, h0, do, dht."""
        gen = torch.Generator().manual_seed(self.seed)
        B, T, H, K, V = self.B, self.T, self.H, self.K, self.V
        rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
        y, v = 2 * rnd(B, T, H * K), rnd(B, T, H, V)
        if self.gate == "uniform30":
            x = -30 * torch.rand(B, T, H * K, generator=gen, dtype=torch.float64)
        else:
            x = self.shift + 2 * rnd(B, T, H * K)
        lb = None
        if self.lower_bound > 0:
            lb = self.lower_bound * (1 - 1e-3 * torch.rand(H * K, generator=gen, dtype=torch.float64))
        h0 = rnd(B, H, K, V) if self.with_state else None
        do, dht = rnd(B, T, H, V), rnd(B, H, K, V)
        return [t.to(device) if t is not None else None for t in (y, x, lb, v, h0, do, dht)]


# Gate regimes of the fixed-shape kernel tests, as Problem fields.
REGIMES = {
    "strong_decay": dict(gate="uniform30"),  # every sub-block on the pair-by-pair in-chunk path
    "moderate": dict(shift=0.0),
    "decay3": dict(shift=-3.0),  # chunks decaying past e^120: the sub-block path
    "long_memory": dict(shift=4.0),  # gates near 1: state carried across segments
}


def problems(max_T=300, dims=(4, 8, 16, 24, 32), max_B=2, max_H=3):
    T = st.one_of(st.just(1), st.integers(1, 70), st.integers(1, max_T))
    return st.builds(
        Problem,
        B=st.integers(1, max_B),
        T=T,
        H=st.integers(1, max_H),
        K=st.sampled_from(dims),
        V=st.sampled_from(dims),
        gate=st.sampled_from(["logits", "logits", "logits", "uniform30"]),
        shift=st.one_of(st.sampled_from([-20.0, 0.0, 20.0]), st.floats(-20, 20)),
        lower_bound=st.sampled_from([0.0, 0.0, 0.5, 0.9, 0.999]),
        with_state=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )


# Hard cases every run draws, whatever the profile: one step, a chunk boundary +- 1, every
# sub-block on the slow path, gates at 1 - 2e-9 (logit +20) and at 2e-9 (logit -20), K != V.
HARD = [
    Problem(B=1, T=1, H=1, K=16, V=32, gate="logits", shift=-20.0, lower_bound=0.0, with_state=True, seed=1),
    Problem(B=1, T=65, H=2, K=32, V=16, gate="uniform30", shift=0.0, lower_bound=0.0, with_state=True, seed=2),
    Problem(B=2, T=63, H=1, K=16, V=16, gate="logits", shift=20.0, lower_bound=0.999, with_state=False, seed=3),
    Problem(B=1, T=130, H=1, K=32, V=32, gate="logits", shift=-3.0, lower_bound=0.0, with_state=True, seed=4),
]


def with_hard_cases(test):
    for p in HARD:
        test = example(p)(test)
    return test

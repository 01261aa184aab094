"""The raw Triton kernels against the float64 chunked reference and the step-by-step loop.

Without a GPU they run under TRITON_INTERPRET=1 (set in conftest.py) on small fp32 shapes; the
interpreter's fp32 matmuls are exact, so this checks the kernels' indexing, masking, the fast
and slow in-chunk paths and the backward algebra, not the GPU's rounding. On the GPU the same
tests run the compiled kernels (the op tests in test_ops.py add bf16 and long sequences).
"""

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from hgrn2mini.kernels import chunk as C
from hgrn2mini.kernels import launch, state
from hgrn2mini.kernels import settings as S
from hypothesis import example, given, settings
from hypothesis import strategies as st
from naive import gated_errors, gated_reference, naive_recurrence, rel_err
from problems import REGIMES, Problem, problems, with_hard_cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: the interpreter is exact to fp32 rounding; on the GPU, 3xTF32 matmuls.
TOL = 1e-4
_examples = min(settings().max_examples, 10) if DEVICE == "cpu" else settings().max_examples


def _inputs(B, T, H, K, V, gate, seed, with_state=True):
    """fp32 q, g, v, h0, do, dht on DEVICE of a problem in one of the gate regimes (problems.REGIMES);
    h0 and dht None without a state."""
    p = Problem(B=B, T=T, H=H, K=K, V=V, with_state=with_state, seed=seed, **REGIMES[gate])
    q, g, v, h0, do, dht = p.inputs(DEVICE)
    return [x.float() if x is not None else None for x in (q, g, v, h0, do, dht if with_state else None)]


def _fwd_bwd_errors(q, g, v, h0, do, dht, scale) -> dict:
    """Relative errors of the kernels' o, final state, dq, dg, dv, dh0 against the float64
    chunked reference."""
    got = C.chunk_hgrn2_fwd(q, g, v, h0, scale) + C.chunk_hgrn2_bwd(q, g, v, h0, do, dht, scale)
    d = lambda x: x.double() if x is not None else None
    want = C.chunk_hgrn2_fwd_ref(d(q), d(g), d(v), d(h0), scale) + C.chunk_hgrn2_bwd_ref(
        d(q), d(g), d(v), d(h0), d(do), d(dht), scale
    )
    names = ["o", "final_state", "dq", "dg", "dv", "dh0"]
    return {n: rel_err(a, b) for n, a, b in zip(names, got, want)}


MODES = ["two_launches", "one_launch"]


def _launches(mode: str):
    """CONFIG for one way of launching the kernels at every K, V: the out and dq/dg kernels twice
    (whole-chunk variant, then the flagged programs again) or once (every path in one launch)."""
    # With two launches: the state walk's paired value tiles (CONFIG state_pair) forced; with one
    # launch the default ("auto" leaves these small B * H unpaired).
    if mode == "two_launches":
        return mock.patch.dict(C.CONFIG, {"two_pass_min_dim": 16, "state_pair": True})
    return mock.patch.dict(C.CONFIG, {"two_pass_min_dim": 10**9})


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=_examples)
@with_hard_cases
@given(problems(max_T=150, dims=(16, 32), max_B=1, max_H=2))
def test_triton_kernels_match_naive_loop(mode, p):
    q, g, v, h0, do, dht = p.inputs(DEVICE)
    scale = p.K**-0.5
    f32 = lambda x: x.float().contiguous() if x is not None else None
    with _launches(mode):
        o, hT = C.chunk_hgrn2_fwd(f32(q), f32(g), f32(v), f32(h0), scale)
        dq, dg, dv, dh0 = C.chunk_hgrn2_bwd(f32(q), f32(g), f32(v), f32(h0), f32(do), f32(dht), scale)

    leaves = [x.detach().clone().requires_grad_() for x in (q, g, v)]
    h0r = h0.detach().clone().requires_grad_() if h0 is not None else None
    o_r, hT_r = naive_recurrence(*leaves, h0r, scale)
    want = torch.autograd.grad((o_r * do).sum() + (hT_r * dht).sum(), leaves + ([h0r] if h0r is not None else []))
    got = {"o": (o, o_r), "final_state": (hT, hT_r), "dq": (dq, want[0]), "dg": (dg, want[1]), "dv": (dv, want[2])}
    if h0 is not None:
        got["dh0"] = (dh0, want[3])
    errs = {k: rel_err(a, b) for k, (a, b) in got.items()}
    assert all(e <= TOL for e in errs.values()), f"{errs} ({p})"


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=_examples)
@with_hard_cases
@given(problems(max_T=150, dims=(16, 32), max_B=2, max_H=2))
def test_gated_kernels_match_float64(mode, p):
    """The gates' Triton kernel (q and g from the logits), the recurrence on them, and its backward
    with the logits given (the dq/dg kernel then carries the gradients through the gates: d
    q_logits, d f_logits and the lower bound's per-chunk sums), against the float64 loop with the
    gates' derivatives by hand. Every output and gradient to 1e-4."""
    from hgrn2mini.kernels.gates import gates_triton

    y, x, lb, v, h0, do, dht = (t.float().contiguous() if t is not None else None for t in p.logits(DEVICE))
    heads = (p.B, p.T, p.H, p.K)
    scale = p.K**-0.5
    with _launches(mode):
        q, g = gates_triton(y, x, lb, C.launcher)
        o, hT, states = C.chunk_hgrn2_fwd_with_states(q.view(heads), g.view(heads), v, h0, scale)
        dy, dx, dlb, dv, dh0 = C.chunk_hgrn2_bwd(q.view(heads), g.view(heads), v, h0, do, dht, scale, states,
                                                 (y.view(heads), x.view(heads), lb))
    want, scales = gated_reference(y, x, lb, v, h0, do, dht, scale)
    got = (o, hT, dy.view(y.shape), dx.view(x.shape), dlb, dv, dh0)
    assert (dlb is None) == (lb is None)
    errs = gated_errors(got, want, scales, elementwise=True)
    assert all(e <= TOL for e in errs.values()), f"{errs} ({p})"


# (ids avoid the word "slow", which pytest would take as the marker of that name)
@pytest.mark.parametrize("gate", ["strong_decay", "moderate"])
def test_triton_kernels_without_final_state_gradient(gate):
    """dht = None (the final state unused) takes its own branch in the reverse state pass."""
    q, g, v, _, do, _ = _inputs(1, 100, 1, 16, 16, gate, seed=1, with_state=False)
    got = C.chunk_hgrn2_bwd(q, g, v, None, do, None, 0.25)
    want = C.chunk_hgrn2_bwd_ref(q.double(), g.double(), v.double(), None, do.double(), None, 0.25)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= TOL


# Several key blocks per program (the forward / dv kernel takes 64 key channels at a time, dq/dg
# 32) and each in-chunk path: one reference per chunk (moderate gates), 16-row sub-blocks (a chunk
# decaying by more than e^120), pair by pair (a sub-block decaying by more than e^60).
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "K, V, T, gate",
    [(128, 16, 70, "moderate"), (64, 32, 150, "decay3"), (64, 64, 100, "strong_decay")],
)
def test_triton_kernels_key_blocks_and_paths(K, V, T, gate, mode):
    q, g, v, h0, do, dht = _inputs(1, T, 2, K, V, gate, seed=2)
    with _launches(mode):
        errs = _fwd_bwd_errors(q, g, v, h0, do, dht, 0.3)
    assert all(e <= TOL for e in errs.values()), errs


def _offline() -> Path:
    """The offline compile checks (tests/offline.py), run as a program of their own."""
    return Path(__file__).resolve().parent / "offline.py"


def test_kernel_variants_compile_with_inductors_argument_types():
    """Every kernel variant compiles for sm_90 with `scale` as Inductor passes it (fp64 scalar or
    constexpr), not only as an eager launch passes it (fp32): a branch that redefined `scale`
    compiles eagerly and fails every torch.compile'd use on the GPU. Compiled
    offline (Triton ships ptxas), in a process of its own (this one runs the interpreter)."""
    script = _offline()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script), "--check", "32", "32"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count(" ok") == 57, run.stdout  # 45 chunk-kernel variants, 12 of the K = V = 1 scan


def test_compile_sees_only_the_outputs_written():
    """torch.compile trusts its own analysis of which arguments a user kernel writes (Triton IR):
    a kernel reported as writing an input runs right eagerly and wrong compiled (kernels/gates.py).
    Every kernel the gated op launches, every variant, must be reported as writing its outputs only.
    Offline (sm_90 stand-in), in a process of its own."""
    script = _offline()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script), "--writes"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count(" ok") == 27, run.stdout  # 21 launches of the chunk path, 6 of the K = V = 1 scan


# The state walk cut into segments walked in parallel, then joined (CONFIG max_segments): forced
# here on small shapes; uneven segments (10 and 11 chunks into 4), with and without states; K = 64
# joins the states in the out kernel in two slices of rows.
@pytest.mark.parametrize("T, with_state, gate, K, V", [(600, True, "long_memory", 16, 32),
                                                       (650, False, "strong_decay", 16, 32),
                                                       (330, True, "moderate", 64, 16)])
def test_triton_kernels_segmented_state_walk(T, with_state, gate, K, V, monkeypatch):
    monkeypatch.setitem(C.CONFIG, "max_segments", 8)
    monkeypatch.setitem(C.CONFIG, "min_segment_chunks", 1)
    monkeypatch.setitem(C.CONFIG, "min_programs", 10**6)
    monkeypatch.setitem(C.CONFIG, "state_pair", True)  # at V = 32 (16 x 16 tiles); "auto" would not pair
    if DEVICE == "cpu":  # on the GPU two launches fault at V = 16 (Triton 3.6): one launch there
        monkeypatch.setitem(C.CONFIG, "two_pass_min_dim", 16)
    launched = []
    real_launch = launch.launcher
    monkeypatch.setattr(launch, "launcher", lambda kernel: launched.append(kernel) or real_launch(kernel))
    q, g, v, h0, do, dht = _inputs(1, T, 2, K, V, gate, seed=3, with_state=with_state)
    errs = _fwd_bwd_errors(q, g, v, h0, do, dht, 0.3)
    assert launched.count(state._segment_kernel) == 3  # forward; backward: states again, and their gradients
    assert launched.count(state._fixup_kernel) == 1  # the states walked again; the others join in the out kernel
    assert all(e <= TOL for e in errs.values()), errs


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("nseg", [1, 2, 3, 5, 8])
def test_segment_kernel_joins_any_number_of_segments(nseg, reverse):
    """The walk over the segments' ends (`_segment_kernel`): the state entering each segment and
    the final one, against a loop, for counts the op launches (powers of two) and others (3, 5),
    so that a kernel taking several segments a step is checked at its ragged end too."""
    BH, K, V, BS = 2, 32, 32, 16
    gen = torch.Generator().manual_seed(nseg)
    seg_end = torch.randn(BH, nseg, K, V, generator=gen).to(DEVICE)
    seg_decay = torch.rand(BH, nseg, K, generator=gen).to(DEVICE)
    h_in = torch.full((BH, nseg, K, V), float("nan"), device=DEVICE)
    hT = torch.empty(BH, K, V, device=DEVICE)
    state._segment_kernel[(K // BS, V // BS, BH)](seg_end, seg_decay, h_in, hT, nseg, K=K, V=V, BS=BS, REVERSE=reverse)
    h, want_in = torch.zeros(BH, K, V, device=DEVICE), torch.empty_like(h_in)
    for s in (reversed(range(nseg)) if reverse else range(nseg)):
        want_in[:, s] = h
        h = seg_decay[:, s, :, None] * h + seg_end[:, s]
    assert torch.allclose(h_in, want_in, rtol=1e-6, atol=1e-6)
    assert torch.allclose(hT, h, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("segmented", [False, True])
def test_triton_backward_from_kept_states(segmented, monkeypatch):
    """The backward given the forward's states (CONFIG keep_states) equals the one that walks the
    sequence again, bit for bit; also where the walks are segmented, so that the kept states were
    joined by the forward's out kernel and the walked-again ones by the fixup kernel."""
    if segmented:
        monkeypatch.setitem(C.CONFIG, "min_segment_chunks", 1)
        monkeypatch.setitem(C.CONFIG, "min_programs", 10**6)
    q, g, v, h0, do, dht = _inputs(1, 150, 2, 16, 32, "moderate", seed=4)
    _, _, states = C.chunk_hgrn2_fwd_with_states(q, g, v, h0, 0.3)
    again = C.chunk_hgrn2_bwd(q, g, v, h0, do, dht, 0.3)
    kept = C.chunk_hgrn2_bwd(q, g, v, h0, do, dht, 0.3, states)
    for a, b in zip(again, kept):
        assert torch.equal(a, b)


def test_launch_config_takes_symbolic_shapes():
    """Under dynamic shapes (opcheck's aot_dispatch_dynamic, torch.compile(dynamic=True)) K and V
    arrive as SymInts, which do not hash: the per-shape override must compare them, not look
    them up."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(q, v):
        return q * S._cfg(q, v, "out_bk") + v * S._cfg(q, v, "dqg_warps", gated=True, has_lb=True)

    q, v = torch.randn(3, 128, dtype=torch.bfloat16), torch.randn(3, 128, dtype=torch.bfloat16)
    gm = make_fx(f, tracing_mode="symbolic")(q, v)
    assert torch.equal(gm(q, v), f(q, v))


def test_launch_config_per_variant(monkeypatch):
    """`_cfg` looks up a dq/dg variant's override first ("gated_lb", "gated"), then the shape's
    plain one, then CONFIG; other shapes and dtypes keep CONFIG."""
    monkeypatch.setattr(S, "FAST", {(64, 64, torch.bfloat16): {"dqg_warps": 2, "out_warps": 2},
                                    (64, 64, torch.bfloat16, "gated"): {"dqg_warps": 8},
                                    (64, 64, torch.bfloat16, "gated_lb"): {"dqg_stages": 3}})
    q = v = torch.empty(1, 1, 1, 64, dtype=torch.bfloat16)
    assert S._cfg(q, v, "dqg_warps") == 2
    assert S._cfg(q, v, "dqg_warps", gated=True) == 8
    assert S._cfg(q, v, "dqg_warps", gated=True, has_lb=True) == 2  # no "gated_lb" entry for it: the plain one
    assert S._cfg(q, v, "dqg_stages", gated=True, has_lb=True) == 3
    assert S._cfg(q, v, "dqg_stages", gated=True) == S.CONFIG["dqg_stages"]
    assert S._cfg(q, v, "out_warps", gated=True) == 2
    assert S._cfg(q.float(), v.float(), "dqg_warps", gated=True) == S.CONFIG["dqg_warps"]


@given(programs=st.integers(1, 4096), NT=st.integers(1, 4096), wave=st.sampled_from([64, 256, 264, 1000]))
@example(programs=192, NT=32, wave=256)  # B*H = 96 at K = V = 128: one wave of 32 steps, no join
@example(programs=128, NT=32, wave=256)  # B*H = 64: two segments, one wave of 16 steps
def test_walk_segments_fill_at_most_one_wave(programs, NT, wave):
    """The state walk's segments (`_segments`): a power of two within CONFIG's bounds that never
    takes the walk past one wave of programs, and the largest such (one more doubling would pass
    the wave, max_segments or the shortest segment). The measured cases: 192 programs are not cut
    (two waves of half-length segments are no faster, and add the join); 128 are
    cut in two."""
    nseg = state._segments(programs, NT, wave)
    limit, shortest = C.CONFIG["max_segments"], C.CONFIG["min_segment_chunks"]
    assert nseg >= 1 and nseg & (nseg - 1) == 0 and nseg <= limit
    assert nseg == 1 or (programs * nseg <= wave and NT >= nseg * shortest)
    assert 2 * nseg > limit or 2 * programs * nseg > wave or NT < 2 * nseg * shortest
    if (programs, NT, wave) == (192, 32, 256):
        assert nseg == 1
    if (programs, NT, wave) == (128, 32, 256):
        assert nseg == 2


# ----------------------------------------------------------------------------------------------
# The gates (kernels/gates.py)
# ----------------------------------------------------------------------------------------------


@given(
    f_center=st.sampled_from([-72.0, -40.0, -12.0, 0.0, 12.0, 40.0]),  # gates within e^-40 of 0 or 1, and ~e^-72
    lb_kind=st.sampled_from(["none", "zero", "tiny", "mid", "near_one"]),
    N=st.sampled_from([1, 37]),
    D=st.sampled_from([16, 48]),
    seed=st.integers(0, 2**16),
)
@example(f_center=-72.0, lb_kind="zero", N=37, D=16, seed=0)  # lb = 0 where lb + exp(x) < 1e-30 (x < -69)
@settings(max_examples=_examples, deadline=None)
def test_gates_match_float64(f_center, lb_kind, N, D, seed):
    """The gates and their written-out backward (fp32 logits, as in training) against the
    definition in float64: q = silu(y), g = log(lb + (1 - lb) sigmoid(x)), and their derivatives
    taken by hand (not through the log-space formulas the code uses), with lb = 0 inside a bounded
    call too. Relative error 1e-5 on every output: fp32 to a few ulps, for gates within e^-40 of
    0 or 1 too. (Autograd through logaddexp is no reference here: in float64 too its lower-bound
    gradient cancels to ~1e-16 absolute where the true one is ~1e-18.)"""
    from hgrn2mini.kernels import gates as G

    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(N, D, generator=gen) * 4
    x = f_center + torch.randn(N, D, generator=gen) * 3
    lb = {"none": None, "zero": torch.zeros(D), "tiny": 1e-7 * (1 + torch.rand(D, generator=gen)),
          "mid": torch.rand(D, generator=gen), "near_one": 1 - 1e-3 * torch.rand(D, generator=gen)}[lb_kind]
    dq, dg = torch.randn(N, D, generator=gen), torch.randn(N, D, generator=gen)
    q, g = G.gates(y, x, lb)
    got = (q, g) + G.gates_bwd(y, x, lb, g, dq, dg)
    # The Triton kernel of the forward (the interpreter on the CPU; libdevice's log1p on the GPU).
    q_t, g_t = G.gates_triton(y.to(DEVICE), x.to(DEVICE), lb.to(DEVICE) if lb is not None else None, C.launcher)

    y, x, dq, dg = y.double(), x.double(), dq.double(), dg.double()
    lb64 = lb.double() if lb is not None else torch.zeros(D, dtype=torch.float64)
    f = lb64 + (1 - lb64) * torch.sigmoid(x)
    s_y = torch.sigmoid(y)
    # log f, exact in float64 near 1 too (there f itself rounds to 1): log1p(-(1 - lb) sigmoid(-x)).
    log_f = torch.where(f < 0.5, torch.log(f), torch.log1p(-(1 - lb64) * torch.sigmoid(-x)))
    want = [y * s_y, log_f, dq * (s_y + y * s_y * (1 - s_y)),
            dg * (1 - lb64) * torch.sigmoid(x) * torch.sigmoid(-x) / f]
    if lb is not None:
        want.append((dg * torch.sigmoid(-x) / f).sum(0))
    else:
        assert got[4] is None
        want.append(None)
    got += (q_t, g_t)
    want += want[:2]
    for name, a, b in zip(("q", "g", "dq_logits", "df_logits", "dlb", "q (Triton)", "g (Triton)"), got, want):
        assert b is None or rel_err(a, b) < 1e-5, name


@given(batch=st.sampled_from([1, 2, 3, 8, 32]), heads=st.sampled_from([1, 6, 8, 16]),
       KV=st.sampled_from([(64, 64), (128, 128), (32, 128)]), max_len=st.integers(2, 9000))
@settings(max_examples=_examples, deadline=None)
def test_prefill_lengths_cover_every_launch(batch, heads, KV, max_len):
    """Every T in [2, max_len] launches the forward as one of `prefill_lengths` does: the same walk
    plan, the same out-kernel REDO and T % 16 == 0 alike (what Triton specializes T on)."""
    K, V = KV
    dev = torch.device("cpu")

    def key(T):
        NT = -(-T // S._BT)
        grid = (V // min(V, C.CONFIG["out_bv"]), NT, batch * heads)
        return state.walk_plan(batch * heads, NT, K, V), launch._redo_chunks(grid, dev), T % 16 == 0

    lengths = C.prefill_lengths(batch, heads, K, V, max_len, device="cpu")
    assert all(2 <= T <= max_len for T in lengths)
    covered = {key(T) for T in lengths}
    for T in range(2, max_len + 1, 7 if max_len > 3000 else 1):
        assert key(T) in covered, T

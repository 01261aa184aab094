"""The benchmark's bookkeeping on the CPU (tiny shapes, a stand-in timer): each figure is the
median over rounds, each round's figures are kept, and the table shows them."""

import importlib.util
import itertools
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_chunk.py"


@pytest.fixture
def bench_chunk(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_chunk", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "DEVICE", "cpu")
    clock = itertools.count(1)

    def fake_bench(fn, grad_to_none=None):
        fn()  # the timed call runs (the op's CPU path, SDPA), its time is a counter
        return float(next(clock))

    monkeypatch.setattr(mod, "bench", fake_bench)
    return mod


def test_each_figure_is_the_median_over_rounds(bench_chunk):
    row = bench_chunk.run_shape(1, 70, 1, 16, bw=1e12, fla=None, rounds=3)
    assert len(row["rounds"]) == 3
    for key in ("ours_fwd", "ours_fwdbwd", "sdpa_fwd", "sdpa_fwdbwd"):
        per_round = sorted(r[key] for r in row["rounds"])
        assert row[key] == per_round[1], (key, row)
    assert len({r["ours_fwdbwd"] for r in row["rounds"]}) == 3  # each round timed on its own
    md = bench_chunk.table([row], 1e12)
    line = md.splitlines()[-1]
    assert line.startswith("| 1, 70, 1, 16 | logsigmoid |")
    assert " / ".join(f"{r['ours_fwdbwd']:.3f}" for r in row["rounds"]) in line
    assert line.count("|") == md.splitlines()[2].count("|")  # as many cells as the header


def test_set_config_reaches_the_per_shape_overrides(bench_chunk, monkeypatch):
    """A launch-config update applies to CONFIG and to each FAST override that sets the key (an
    override would otherwise win over the update), and the next update starts from the base."""
    from hgrn2mini.kernels import chunk

    monkeypatch.setattr(chunk, "CONFIG", dict(chunk.CONFIG))
    monkeypatch.setattr(chunk, "FAST", {k: dict(o) for k, o in chunk.FAST.items()})
    base, base_fast = dict(chunk.CONFIG), dict(chunk.FAST)
    key = next(iter(base_fast))
    overridden = next(iter(base_fast[key]))
    bench_chunk.set_config(chunk, base, base_fast, {overridden: 16, "state_stages": 2})
    assert chunk.CONFIG[overridden] == 16 and chunk.CONFIG["state_stages"] == 2
    assert chunk.FAST[key][overridden] == 16 and "state_stages" not in chunk.FAST[key]
    bench_chunk.set_config(chunk, base, base_fast, {})
    assert chunk.CONFIG == base and chunk.FAST == base_fast

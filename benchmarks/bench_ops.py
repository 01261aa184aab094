"""The recurrence as users run it, beside fla and flash attention, on one GPU in one process.

    python benchmarks/bench_ops.py --out results/                    # every row at every shape
    python benchmarks/bench_ops.py --out results/ --shapes 8x2048x8x128 --rows gated,mixer
    python benchmarks/bench_ops.py --out results/ --rows short       # prompt-sized T, eager

Rows (bf16, forward + backward unless named otherwise; shapes are B x T x H x K with V = K):
    op      `chunk_hgrn2(q, g, v)`, and fla's `chunk_gla` on the same q, g, v with k = 1 - exp(g)
    gated   `gated_chunk_hgrn2` as the model calls it: gates from their logits, with a lower bound
            (every layer but the first) and without (layer 0)
            (op and gated also with Triton's own launch path, rows "..., Triton's launches": the
            eager cost that launching through the compiled kernels removes, kernels/launch.py)
    mixer   the token mixer `HGRN2Attention` (hidden size H * K, expand ratio K, a lower bound)
            against fla's `fla.layers.HGRN2Attention` of the same sizes and bound
    sdpa    causal `scaled_dot_product_attention` (flash) at the same B, H, T, head dim
    short   T in {1, 16, 64, 256} at B = 1, H = 8: the gated op's and the mixer's forward, eager
            (prompt prefill), ours and fla's

Each figure is timed two ways: device time, the call captured in a CUDA graph (after three calls
on a side stream, gradients set to None) and replayed; and eager wall time, `do_bench` over plain
calls, which adds the host's dispatch and launches. Both are medians; the table gives their ratio
(eager / device: 1.0 means the call is not host-bound). fla is imported if installed; its rows
are left out otherwise. Writes bench_ops.json and bench_ops.md to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

SHAPES = "8x2048x8x128,4x4096x8x128,2x8192x8x128,1x16384x8x128,8x2048x16x128,16x2048x6x128,8x2048x16x64"
ROWS = ("op", "gated", "mixer", "sdpa", "short")


def device_ms(fn, leaves=()):
    """Median replay time of fn captured in a CUDA graph, or None where capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        for t in leaves:
            t.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
        del graph
        return ms
    except Exception as e:  # noqa: BLE001 - a competitor that cannot be captured is reported, not fatal
        print(f"  capture failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
        return None
    finally:
        for t in leaves:
            t.grad = None


def eager_ms(fn, leaves=()):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=200, return_mode="median", grad_to_none=list(leaves) or None)


def both(fn, leaves=()):
    """(device ms, eager ms): eager first, since a failed capture can leave the process's CUDA
    state unusable for later eager calls of the same function."""
    eager = eager_ms(fn, leaves)
    return device_ms(fn, leaves), eager


def triton_launches(fn):
    """fn with every kernel launched through Triton's own launch path (CONFIG["direct_launch"]
    off), for the eager cost that the compiled launchers remove; the same kernels on the device."""
    from hgrn2mini.kernels.settings import CONFIG

    def call():
        CONFIG["direct_launch"] = False
        try:
            return fn()
        finally:
            CONFIG["direct_launch"] = True

    return call


def fwd_bwd(fn, leaves):
    """A forward+backward closure of fn (returning one tensor) with a fixed random output gradient."""
    do = _randn(*fn().shape, dtype=torch.bfloat16)

    def step():
        fn().backward(do)

    return step


_CPU = torch.Generator().manual_seed(0)


def _randn(*shape, dtype=torch.float32):
    """Random inputs drawn on the CPU: a failed CUDA-graph capture (fla's, at some shapes) leaves
    the CUDA random generator of the process unusable."""
    return torch.randn(*shape, generator=_CPU).to("cuda", dtype)


def _fla():
    try:
        from fla.layers import HGRN2Attention
        from fla.ops.gla import chunk_gla
    except Exception:  # noqa: BLE001 - fla is optional here
        return None
    return chunk_gla, HGRN2Attention


def rows_for_shape(B, T, H, K, rows, fla):
    from hgrn2mini import HGRN2Config
    from hgrn2mini.model import HGRN2Attention
    from hgrn2mini.ops import chunk_hgrn2, gated_chunk_hgrn2

    dev, bf = "cuda", torch.bfloat16
    V, D = K, H * K
    out = {}
    leaf = lambda *s, dtype=bf: _randn(*s, dtype=dtype).requires_grad_()
    if "op" in rows:
        q, v = leaf(B, T, H, K), leaf(B, T, H, V)
        g = F.logsigmoid(_randn(B, T, H, K) * 2 + 2).requires_grad_()
        out["op"] = both(fwd_bwd(lambda: chunk_hgrn2(q, g, v)[0], (q, g, v)), (q, g, v))
        out["op, Triton's launches"] = both(triton_launches(fwd_bwd(lambda: chunk_hgrn2(q, g, v)[0], (q, g, v))),
                                            (q, g, v))
        with torch.no_grad():
            out["op fwd"] = both(lambda: chunk_hgrn2(q, g, v)[0])
        if fla:
            k = (1 - g.detach().exp()).to(bf).requires_grad_()
            g2 = g.detach().clone().requires_grad_()
            f = lambda: fla[0](q, k, v, g2, scale=K**-0.5)[0]
            out["op fla"] = both(fwd_bwd(f, (q, k, v, g2)), (q, k, v, g2))
            with torch.no_grad():
                out["op fwd fla"] = both(f)
    if "gated" in rows:
        ql, fl, v = leaf(B, T, D), leaf(B, T, D), leaf(B, T, H, V)
        lb = (_randn(D).sigmoid() * 0.9).requires_grad_()
        gated = fwd_bwd(lambda: gated_chunk_hgrn2(ql, fl, lb, v)[0], (ql, fl, lb, v))
        out["gated"] = both(gated, (ql, fl, lb, v))
        out["gated, Triton's launches"] = both(triton_launches(gated), (ql, fl, lb, v))
        out["gated, no bound"] = both(fwd_bwd(lambda: gated_chunk_hgrn2(ql, fl, None, v)[0], (ql, fl, v)),
                                      (ql, fl, v))
    if "mixer" in rows:
        x = leaf(B, T, D)
        lb = _randn(D).sigmoid() * 0.9
        config = HGRN2Config(hidden_size=D, num_hidden_layers=2, expand_ratio=K)
        ours = HGRN2Attention(config, layer_idx=1).to(dev, bf)
        leaves = (x, *ours.parameters())
        out["mixer"] = both(fwd_bwd(lambda: ours(x, lb, None)[0], leaves), leaves)
        if fla:
            theirs = fla[1](mode="chunk", hidden_size=D, expand_ratio=K, layer_idx=1).to(dev, bf)
            leaves = (x, *theirs.parameters())
            out["mixer fla"] = both(fwd_bwd(lambda: theirs(x, lower_bound=lb)[0], leaves), leaves)
    if "sdpa" in rows:
        qs, ks, vs = (leaf(B, H, T, K) for _ in range(3))
        f = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        out["sdpa"] = both(fwd_bwd(f, (qs, ks, vs)), (qs, ks, vs))
    return out


def short_rows(fla):
    """Prompt-sized sequences: forward only, eager (what a prefill pays), B = 1, H = 8, K = 128."""
    from hgrn2mini import HGRN2Config
    from hgrn2mini.model import HGRN2Attention
    from hgrn2mini.ops import gated_chunk_hgrn2

    dev, bf, H, K = "cuda", torch.bfloat16, 8, 128
    D = H * K
    config = HGRN2Config(hidden_size=D, num_hidden_layers=2, expand_ratio=K)
    ours = HGRN2Attention(config, layer_idx=1).to(dev, bf)
    theirs = fla[1](mode="chunk", hidden_size=D, expand_ratio=K, layer_idx=1).to(dev, bf) if fla else None
    lb = _randn(D).sigmoid() * 0.9
    out = {}
    with torch.no_grad():
        for T in (1, 16, 64, 256):
            ql, fl, x = (_randn(1, T, D, dtype=bf) for _ in range(3))
            v = _randn(1, T, H, K, dtype=bf)
            if T > 1:
                out[f"T={T} gated op fwd"] = both(lambda: gated_chunk_hgrn2(ql, fl, lb, v)[0])
            out[f"T={T} mixer fwd"] = both(lambda: ours(x, lb, None)[0])
            if theirs is not None:
                out[f"T={T} mixer fwd fla"] = both(lambda: theirs(x, lower_bound=lb)[0])
    return out


def copy_tbps():
    x = torch.empty(1 << 28, device="cuda", dtype=torch.bfloat16).uniform_()
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() * 2 / ms / 1e9


def markdown(result):
    lines = [f"{result['date']}, {result['device']}, torch {result['torch']}, Triton {result['triton']}; "
             f"copy {result['copy_TBps']:.2f} TB/s. ms, medians; ratio = eager / device.", "",
             "| shape | row | device ms | eager ms | eager/device | fla/ours device | fla/ours eager |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"
    for shape, rows in result["shapes"].items():
        for name, (dev_ms, eager) in rows.items():
            if name.endswith(" fla"):
                continue
            ratio = eager / dev_ms if dev_ms else None
            fla = rows.get(name + " fla")
            vs = [fla[i] / t if fla and fla[i] and t else None for i, t in enumerate((dev_ms, eager))]
            lines.append(f"| {shape} | {name} | {fmt(dev_ms)} | {fmt(eager)} | {fmt(ratio)} | {fmt(vs[0])} | "
                         f"{fmt(vs[1])} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for bench_ops.json and .md")
    p.add_argument("--shapes", default=SHAPES, help="comma-separated B x T x H x K (V = K)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    p.add_argument("--fla-shapes", default="all",
                   help="shapes with fla's rows beside ours ('all', or a comma-separated subset of --shapes): "
                        "fla autotunes its kernels at each new shape")
    args = p.parse_args(argv)
    rows = set(args.rows.split(","))
    if not rows <= set(ROWS):
        p.error(f"--rows must be a subset of {ROWS}, got {sorted(rows - set(ROWS))}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    fla = _fla()
    result = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "fla": fla is not None, "copy_TBps": copy_tbps(), "shapes": {}}
    for shape in args.shapes.split(",") if rows - {"short"} else []:
        B, T, H, K = map(int, shape.split("x"))
        print(f"{shape} ...", flush=True)
        with_fla = fla if args.fla_shapes == "all" or shape in args.fla_shapes.split(",") else None
        result["shapes"][shape] = rows_for_shape(B, T, H, K, rows, with_fla)
        torch.cuda.empty_cache()
        (args.out / "bench_ops.json").write_text(json.dumps(result, indent=1))
    if "short" in rows:
        result["shapes"]["1xTx8x128"] = short_rows(fla)
    (args.out / "bench_ops.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (args.out / "bench_ops.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()

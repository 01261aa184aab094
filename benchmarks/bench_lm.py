"""Training-step benchmark of the 374M language model: ours (compiled) against fla's HGRN2 (eager)
and a LLaMA of the same size from transformers (compiled, SDPA).

    python benchmarks/bench_lm.py --out results                     # everything (~15 min on an H200)
    python benchmarks/bench_lm.py --models ours,llama --regional    # ours with compile_regions(), as train.py
    python benchmarks/bench_lm.py --models ours --regional --mode reduce-overhead   # CUDA graphs too
    python benchmarks/bench_lm.py --models fla --out results        # fla alone: it autotunes for minutes

One step = forward with labels, backward, fused AdamW step, zero_grad; bf16 weights (and so bf16
optimizer states); each model with its
library's training loss head: ours `fuse_linear_cross_entropy` (as examples/train.py; --logits-loss
for the loss from the logits), fla its default (logits and its fused cross-entropy), LLaMA
transformers' (logits, then cross-entropy in fp32). Per model and shape:
the first step's time (compilation or fla's Triton autotuning included, as a fresh machine pays
it), then 2 more warm-up steps, then the mean of --steps synchronized steps and the peak memory
allocated during them. Each (model, shape) starts from a reset compiler cache and an empty
allocator. Results are written after every configuration, so a run cut short keeps what it had;
--budget-s skips the configurations that would start after the budget is spent.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

D, LAYERS, VOCAB, EXPAND, INTERMEDIATE = 1024, 24, 32000, 128, 2816  # the anchors' 374M configuration
MODELS = ("ours", "fla", "llama")


def build(name: str, seq_len: int, fused_loss: bool = True) -> torch.nn.Module:
    if name == "ours":  # the loss head examples/train.py trains with, unless fused_loss is off
        from hgrn2mini import HGRN2Config, HGRN2ForCausalLM

        config = HGRN2Config.from_preset("374M", vocab_size=VOCAB, fuse_linear_cross_entropy=fused_loss)
        return HGRN2ForCausalLM(config)
    if name == "fla":
        from fla.models import HGRN2Config, HGRN2ForCausalLM  # installed on the GPU machine from wheels

        return HGRN2ForCausalLM(HGRN2Config(hidden_size=D, num_hidden_layers=LAYERS, expand_ratio=EXPAND,
                                            vocab_size=VOCAB))
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=8,
                             intermediate_size=INTERMEDIATE, vocab_size=VOCAB,
                             max_position_embeddings=max(4096, seq_len))
        config._attn_implementation = "sdpa"
        return LlamaForCausalLM(config)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def compiler_counts() -> dict[str, int]:
    """Graphs and graph breaks Dynamo recorded (its counters are internal: read them if present)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def bench(name: str, B: int, T: int, compile_: bool, steps: int, warmup: int, regional: bool = False,
          fused_loss: bool = True, mode: str = "default") -> dict:
    dev = "cuda"
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build(name, T, fused_loss).to(dev, torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, VOCAB, (B, T), device=dev)
    kw = dict(dynamic=False, mode=None if mode == "default" else mode)
    if compile_ and regional:  # ours only: each block and the head compiled on their own
        m = model.compile_regions(**kw)
    else:
        m = torch.compile(model, **kw) if compile_ else model

    def step():
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    torch.cuda.synchronize()
    t = time.perf_counter()
    loss = step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    print(f"  {name} {B}x{T}: first step {first:.1f} s, loss {loss.item():.3f}", flush=True)
    for _ in range(warmup - 1):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    result = {
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_ms": dt * 1e3,
        "tok_per_s": B * T / dt,
        "peak_GB": torch.cuda.max_memory_allocated() / 1e9,
        "first_step_s": first,
        "final_loss": loss.item(),
        "compiled": compile_,
        "regional": compile_ and regional,
        "mode": mode,
    }
    if compile_:
        result.update(compiler_counts())
    return result  # the model and optimizer go with this frame; the caller empties the cache


def environment() -> dict:
    env = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
           "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for mod in ("triton", "fla", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # absent, or fails to import: the model that needs it will say why
            env[mod] = None
    return env


def main(argv: list[str] | None = None) -> int:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("--models", default=os.environ.get("MODELS", ",".join(MODELS)),
                   help=f"comma-separated subset of {','.join(MODELS)} (env MODELS)")
    p.add_argument("--shapes", default=os.environ.get("SHAPES", "8x2048,2x8192"),
                   help="comma-separated BxT (env SHAPES)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps, the first one included")
    p.add_argument("--eager", action="store_true", help="run ours and llama without torch.compile too")
    p.add_argument("--regional", action="store_true", help="compile ours by blocks (compile_regions)")
    p.add_argument("--mode", default="default", choices=("default", "reduce-overhead"),
                   help="torch.compile mode for the compiled models (reduce-overhead: CUDA graphs)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for the JSON (env OUT); none: print only")
    p.add_argument("--logits-loss", action="store_true",
                   help="ours: loss from the [tokens, vocab] logits, not fuse_linear_cross_entropy")
    p.add_argument("--kernel-config", default=os.environ.get("KERNEL_CONFIG"),
                   help="JSON of hgrn2mini.kernels.chunk.CONFIG updates for ours (env KERNEL_CONFIG)")
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("BUDGET_S", "inf")),
                   help="start no new configuration after this many seconds (env BUDGET_S)")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if bad := [m for m in models if m not in MODELS]:
        p.error(f"--models must be a subset of {','.join(MODELS)}, got {bad}")
    try:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",") if s.strip()]
        assert all(len(s) == 2 and min(s) > 0 for s in shapes)
    except (ValueError, AssertionError):
        p.error(f"--shapes must be comma-separated BxT with positive B and T, e.g. 8x2048, got {args.shapes!r}")
    if not torch.cuda.is_available():
        p.error("this benchmark needs CUDA (it measures GPU tokens/s and memory)")
    if args.warmup < 1 or args.steps < 1:
        p.error(f"--warmup and --steps must be >= 1, got {args.warmup} and {args.steps}")

    if args.kernel_config:
        from hgrn2mini.kernels import chunk

        chunk.CONFIG.update(json.loads(args.kernel_config))
        # Inductor's on-disk caches key on the traced graph, not on CONFIG: a graph compiled under
        # another CONFIG would be served. Compile afresh.
        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False
    out_dir = args.out
    tag = ("_".join(models) + ("_regional" if args.regional else "") + ("_graphs" if args.mode != "default" else "") + ("_kcfg" if args.kernel_config else "")
           + ("_logits_loss" if args.logits_loss else ""))
    out_path = Path(out_dir) / f"bench_lm_{tag}.json" if out_dir else None
    results = {"_about": {**environment(), "config": dict(hidden=D, layers=LAYERS, vocab=VOCAB, expand_ratio=EXPAND),
                          "kernel_config": args.kernel_config, "regional": args.regional, "mode": args.mode,
                          "ours_fuse_linear_cross_entropy": not args.logits_loss,
                          "method": f"bf16 weights, fused AdamW, {args.warmup} warm-up steps (first timed "
                                    f"separately), mean of {args.steps} synchronized steps"}}
    t0 = time.perf_counter()
    runs = []
    for name in models:
        for B, T in shapes:
            compiled = [name != "fla"]  # fla's model is measured eager, as in the anchors
            if args.eager and name != "fla":
                compiled.append(False)
            runs += [(name, B, T, c) for c in compiled]
    for name, B, T, c in runs:
        how = ("regional" if args.regional and name == "ours" else "compiled") if c else "eager"
        key = f"{name}_{how}_B{B}_T{T}"
        if time.perf_counter() - t0 > args.budget_s:
            results[key] = {"skipped": f"--budget-s {args.budget_s:.0f} spent"}
            continue
        print(f"[{time.perf_counter() - t0:6.1f}s] {key}", flush=True)
        try:
            results[key] = bench(name, B, T, c, args.steps, args.warmup, args.regional and name == "ours",
                                 not args.logits_loss, args.mode)
        except Exception as e:  # an import that fails, an OOM: record it and go on with the others
            traceback.print_exc()
            results[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        gc.collect()
        torch.cuda.empty_cache()
        if out_path:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(results, indent=1) + "\n")

    print(f"\n{'configuration':40} {'tok/s':>10} {'step ms':>9} {'peak GB':>8} {'first s':>8}")
    for key, r in results.items():
        if key.startswith("_"):
            continue
        if "tok_per_s" in r:
            print(f"{key:40} {r['tok_per_s']:10,.0f} {r['step_ms']:9.1f} {r['peak_GB']:8.2f} {r['first_step_s']:8.1f}")
        else:
            print(f"{key:40} {r.get('error') or r.get('skipped')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

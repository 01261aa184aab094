"""Generation benchmark of the 374M model in bf16 with random weights: ours (each capture of the
decode step, `hgrn2mini.generation`) against fla's HGRN2 through transformers' `generate`, and
transformers' LLaMA of the same size with its static cache (which `generate` compiles).

    python benchmarks/bench_generate.py --out results/                       # everything, cut at --budget-s
    python benchmarks/bench_generate.py --out r --competitors ours --captures compile+graph
    python benchmarks/bench_generate.py --out r --flat-tokens 0 --competitors ours,fla   # no flatness run
    python benchmarks/bench_generate.py --out r --competitors ours --captures compile+graph,graph \
        --flat-tokens 0 --fused both        # the fused decode kernels beside the PyTorch block

Rows, each at batch 1 and --batch, prompts --prompts (512 and 2048), greedy:
- ours, per capture in --captures and per decode block in --fused (the fused Triton kernels of
  `hgrn2mini.decode`, rows suffixed _fused, and the PyTorch block, _pytorch; "compile" traces the
  PyTorch block only): warm-up at the row's shape (its time recorded: compilation and
  capture), then the time to first token (wall clock, synchronized: the prompt read and the first
  token chosen) and tokens/s over --tokens new tokens (batch x tokens after the first, over CUDA
  events recorded after each step: the device's timeline, host gaps included). "none" (the eager
  step) runs --eager-tokens only.
- flatness: ours at batch 1, 512-token prompt, --flat-capture: the time per token from the 10th to
  the --flat-tokens-th, as the mean of each of 10 equal buckets, and their spread (max/min - 1).
- compile count: after `warmup` up to the longest of five prompt lengths (--lengths), one generation at each: the
  graphs torch.compile built and the Triton kernels compiled meanwhile (both 0 when warm-up covers
  them), and each length's time to first token.
- fla and LLaMA: transformers' generate, timed at 1 and at --hf-tokens new tokens (min_new_tokens
  set, so eos does not stop it): time to first token = the 1-token call, tokens/s = batch x
  (tokens - 1) / the difference. fla is installed on the GPU machine from wheels; a competitor that
  fails to import or to run is recorded with its error and the others go on.

Results go to --out as bench_generate.json and bench_generate.md, rewritten after every row; rows
that would start after --budget-s are recorded as skipped.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

VOCAB = 32000


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def ours_model():
    from hgrn2mini import HGRN2Config, HGRN2ForCausalLM

    return HGRN2ForCausalLM(HGRN2Config.from_preset("374M")).to("cuda", torch.bfloat16).eval()


def run_ours(model, B: int, P: int, N: int, capture: str, fused: bool | None = None) -> dict:
    from hgrn2mini import generation

    ids = torch.randint(0, VOCAB, (B, P), device="cuda")
    t = sync_time()
    generation.warmup(model, (B,), prompt_lengths=(P,), padded=False, temperature=0, capture=capture, fused=fused)
    warm_s = sync_time() - t
    t = sync_time()
    it = model.generate(ids, N, temperature=0, capture=capture, fused=fused)
    next(it)
    ttft = sync_time() - t
    events = [torch.cuda.Event(enable_timing=True) for _ in range(N)]
    events[0].record()
    for i, _ in enumerate(it, 1):
        events[i].record()
    torch.cuda.synchronize()
    per = [a.elapsed_time(b) for a, b in zip(events, events[1:])]  # ms, tokens 2..N
    return {"warmup_s": round(warm_s, 2), "ttft_ms": round(ttft * 1e3, 2), "tokens": N,
            "tok_per_s": round(B * len(per) / (sum(per) / 1e3), 1), "ms_per_step": round(sum(per) / len(per), 4)}


def run_flat(model, N: int, capture: str) -> dict:
    ids = torch.randint(0, VOCAB, (1, 512), device="cuda")
    events = [torch.cuda.Event(enable_timing=True) for _ in range(N + 1)]
    torch.cuda.synchronize()
    events[0].record()
    for i, _ in enumerate(model.generate(ids, N, temperature=0, capture=capture), 1):
        events[i].record()
    torch.cuda.synchronize()
    per = [a.elapsed_time(b) for a, b in zip(events[10:], events[11:])]  # token 11 onwards
    k = len(per) // 10
    buckets = [sum(per[i * k : (i + 1) * k]) / k for i in range(10)]
    return {"tokens": N, "bucket_ms": [round(b, 4) for b in buckets],
            "spread": round(max(buckets) / min(buckets) - 1, 4)}


def run_compile_count(model, lengths: list[int], capture: str) -> dict:
    from hgrn2mini import generation

    t = sync_time()
    # The warm-up covers every length up to the longest (prefill_lengths), not these five.
    generation.warmup(model, (1,), max_prompt_len=max(lengths), padded=False, temperature=0, capture=capture)
    warm_s = sync_time() - t
    before = generation.compile_counts()
    ttft = {}
    for P in lengths:
        ids = torch.randint(0, VOCAB, (1, P), device="cuda")
        t = sync_time()
        next(model.generate(ids, 4, temperature=0, capture=capture))
        ttft[P] = round((sync_time() - t) * 1e3, 2)
    after = generation.compile_counts()
    return {"warmup_s": round(warm_s, 2), "new_compilations": {k: after[k] - before[k] for k in after},
            "ttft_ms_by_length": ttft}


def hf_model(name: str):
    if name == "fla":
        from fla.models import HGRN2Config, HGRN2ForCausalLM  # installed on the GPU machine from wheels

        cfg = HGRN2Config(hidden_size=1024, num_hidden_layers=24, expand_ratio=128, vocab_size=VOCAB)
        return HGRN2ForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=8,
                      intermediate_size=2816, vocab_size=VOCAB, max_position_embeddings=8192)
    return LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()


def run_hf(model, name: str, B: int, P: int, N: int) -> dict:
    ids = torch.randint(3, VOCAB, (B, P), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    if name == "llama":
        kw["cache_implementation"] = "static"  # generate compiles the forward for a static cache

    def timed(n):
        t = sync_time()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return sync_time() - t

    t = sync_time()
    timed(2)  # compile (LLaMA) or autotune (fla) at this shape
    warm_s = sync_time() - t
    t1, tn = timed(1), timed(N)
    return {"warmup_s": round(warm_s, 2), "ttft_ms": round(t1 * 1e3, 2), "tokens": N,
            "tok_per_s": round(B * (N - 1) / (tn - t1), 1), "ms_per_step": round((tn - t1) / (N - 1) * 1e3, 4)}


def environment() -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
           "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "python": platform.python_version(),
           "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for mod in ("triton", "fla", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # absent, or fails to import: the row that needs it says why
            env[mod] = None
    return env


def markdown(results: dict) -> str:
    about = results["_about"]
    lines = [f"# Generation, 374M bf16, random weights ({about['gpu']}, {about['date']})", "",
             f"`{about['command']}`; torch {about['torch']}, triton {about['triton']}, fla {about['fla']}, "
             f"transformers {about['transformers']}", "",
             "| row | tokens/s | time to first token (ms) | ms / step | warm-up (s) | note |",
             "|---|---|---|---|---|---|"]
    for key, r in results.items():
        if key.startswith("_"):
            continue
        note = r.get("error") or r.get("skipped") or ""
        if "bucket_ms" in r:
            note = f"buckets (ms) {r['bucket_ms']}, spread {r['spread']:.1%}"
        if "new_compilations" in r:
            note = f"new compilations {r['new_compilations']}, TTFT by length {r['ttft_ms_by_length']}"
        lines.append(f"| {key} | {r.get('tok_per_s', '')} | {r.get('ttft_ms', '')} | {r.get('ms_per_step', '')} "
                     f"| {r.get('warmup_s', '')} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("--out", required=True, help="directory for bench_generate.json and .md")
    p.add_argument("--competitors", default="ours,fla,llama", help="comma-separated subset of ours,fla,llama")
    p.add_argument("--captures", default="compile+graph,graph,compile,none",
                   help="ours: decode-step captures, the first measured before the competitors")
    p.add_argument("--fused", default="both", choices=["both", "on", "off", "auto"],
                   help="ours: the decode block, fused Triton kernels (on) or the PyTorch block (off); both "
                        "measures each capture both ways (compile: off only), rows suffixed _fused / _pytorch")
    p.add_argument("--batch", type=int, default=32, help="the batch size beside batch 1")
    p.add_argument("--prompts", default="512,2048", help="prompt lengths")
    p.add_argument("--tokens", type=int, default=512, help="ours: new tokens per row")
    p.add_argument("--eager-tokens", type=int, default=32, help="ours with capture none: new tokens per row")
    p.add_argument("--flat-tokens", type=int, default=10000, help="flatness run's new tokens (0: skip)")
    p.add_argument("--flat-capture", default="compile+graph", help="the capture of the flatness run")
    p.add_argument("--lengths", default="100,333,512,1000,2048", help="compile count: five prompt lengths")
    p.add_argument("--hf-tokens", type=int, default=48, help="fla and LLaMA: new tokens per row")
    p.add_argument("--llama-prompts", default="512", help="LLaMA's prompt lengths (each shape compiles anew)")
    p.add_argument("--budget-s", type=float, default=330.0, help="start no new row after this many seconds")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this benchmark needs CUDA")
    competitors = [c for c in args.competitors.split(",") if c]
    prompts = [int(x) for x in args.prompts.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"_about": environment()}
    t0 = time.perf_counter()

    def row(key: str, fn, *a) -> None:
        if time.perf_counter() - t0 > args.budget_s:
            results[key] = {"skipped": f"--budget-s {args.budget_s:.0f} spent"}
        else:
            print(f"[{time.perf_counter() - t0:6.1f}s] {key}", flush=True)
            try:
                results[key] = fn(*a)
            except Exception as e:  # an import that fails, an OOM, a capture that fails: record, go on
                traceback.print_exc()
                results[key] = {"error": f"{type(e).__name__}: {e}"[:400]}
            print(f"    {results[key]}", flush=True)
        (out / "bench_generate.json").write_text(json.dumps(results, indent=1))
        (out / "bench_generate.md").write_text(markdown(results))

    # Rows in order of importance, so that --budget-s cuts the least useful: ours with the first
    # capture, its flatness and compile count, fla, LLaMA, then ours with the other captures.
    captures = args.captures.split(",")
    ours = hf = None
    if "ours" in competitors:
        torch.manual_seed(0)
        ours = ours_model()

    def ours_rows(capture: str) -> None:
        n = args.eager_tokens if capture == "none" else args.tokens
        fused = {"both": [True, False], "on": [True], "off": [False], "auto": [None]}[args.fused]
        if capture == "compile":  # compiles the PyTorch block only
            fused = [f for f in fused if f is not True] or [False]
        for f in fused:
            tag = {True: "_fused", False: "_pytorch", None: ""}[f]
            for B in (1, args.batch):
                for P in prompts:
                    row(f"ours_{capture}{tag}_B{B}_P{P}", run_ours, ours, B, P, n, capture, f)

    if ours is not None:
        ours_rows(captures[0])
        if args.flat_tokens > 0:
            row(f"ours_{args.flat_capture}_flatness_B1_P512", run_flat, ours, args.flat_tokens, args.flat_capture)
        lengths = [int(x) for x in args.lengths.split(",")]
        row(f"ours_{args.flat_capture}_compile_count", run_compile_count, ours, lengths, args.flat_capture)
    for name in [c for c in ("fla", "llama") if c in competitors]:
        hf = None
        gc.collect()
        torch.cuda.empty_cache()
        try:
            hf = hf_model(name)
        except Exception as e:  # fla absent: say so
            row(name, lambda e=e: {"error": f"{type(e).__name__}: {e}"[:400]})
            continue
        for B in (1, args.batch):
            for P in prompts if name == "fla" else [int(x) for x in args.llama_prompts.split(",")]:
                row(f"{name}_B{B}_P{P}", run_hf, hf, name, B, P, args.hf_tokens)
    if ours is not None:
        for capture in captures[1:]:
            ours_rows(capture)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""HGRN2, HGRN1 (HGRN2 at expand_ratio 1) and a LLaMA-style Transformer, language-modelled side by side.

    python examples/compare_lm.py --out out/compare_lm          # ~7.5 min on one H200
    python examples/compare_lm.py --data corpus/ --steps 2000   # your text, a fixed length

The three models have the same width, depth and MLP, hence the same parameter count (within
0.1%: HGRN2's lower bounds and output norms), and train on the same tokens in the same order
with the same schedule and seed, through train.py's pipeline (data.py's documents, split, BPE
and packed batches; train.py's optimizer, schedule, loop and evaluation). Default corpus: a seeded sample
of --corpus-mb of the installed Python packages' sources (site-packages), split by document.

Without --steps the run length comes from --time-budget: each model's step and evaluation are
timed on a few batches first, and every model then trains the number of steps that lets all
three finish in the budget. Outputs in --out: results.md and results.json (final validation
perplexity, tokens/s, parameters), perplexity.png (validation perplexity against tokens, the
three models), and per model its metrics.jsonl and loss.png.

The models run eagerly (no torch.compile). hgrn1's K = V = 1 heads run on their own Triton
scan (one channel a lane, step by step), hgrn2's on the chunked kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, however we're launched
import data  # noqa: E402
import report  # noqa: E402
import train  # noqa: E402
from transformer import TransformerConfig, TransformerForCausalLM  # noqa: E402

from hgrn2mini import HGRN2Config, HGRN2ForCausalLM  # noqa: E402

MODELS = ("hgrn2", "hgrn1", "transformer")
LABELS = {"hgrn2": "HGRN2", "hgrn1": "HGRN1 (HGRN2, K=1)", "transformer": "Transformer (LLaMA-style)"}
DEFAULTS = dict(vocab_size=8192, seq_len=512, batch_size=32, micro_batch_size=None, steps=None, lr=2e-3, warmup=None)
NOTES = dict(steps="(default: as many as --time-budget allows, the same for every model)",
             warmup="(default: a tenth of --steps)", micro_batch_size="(default: --batch-size)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=train.HelpFormatter)
    p.add_argument("--out", default="out/compare_lm", help="output folder")
    p.add_argument("--models", type=train.names_arg(MODELS), default=list(MODELS), metavar="M[,M...]",
                   help=f"models to train, in this order, from {','.join(MODELS)} (default: all)")
    g = p.add_argument_group("models (the same for all three)")
    g.add_argument("--hidden-size", type=int, default=512, help="width D")
    g.add_argument("--layers", type=int, default=8, help="blocks")
    g.add_argument("--expand-ratio", type=int, default=128, help="hgrn2's K (hgrn1's is 1)")
    g.add_argument("--head-dim", type=int, default=64, help="the Transformer's attention head size")
    g = p.add_argument_group("data")
    train.add_data_args(g, default_corpus="--corpus-mb of the installed packages' .py sources")
    g.add_argument("--corpus-mb", type=float, default=256.0,
                   help="size of the default corpus's sample, in MiB (all of site-packages' sources if fewer): "
                        "enough that a budgeted run on one GPU sees its tokens about once")
    train.add_optimization_args(p.add_argument_group("optimization"), DEFAULTS, NOTES)
    g = p.add_argument_group("run")
    g.add_argument("--time-budget", type=float, default=330.0,
                   help="seconds for the whole script, data preparation included, when --steps is not given")
    g.add_argument("--evals", type=int, default=20, help="validation points per model")
    g.add_argument("--eval-tokens", type=int, default=131072, help="validation tokens per evaluation")
    g.add_argument("--log-every", type=int, default=10,
                   help="steps between metric writes (each one waits for the device)")
    g.add_argument("--device", default=None, help="(default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU)")
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.micro_batch_size = args.micro_batch_size or args.batch_size
    for name in ("hidden_size", "layers", "expand_ratio", "head_dim", "vocab_size", "seq_len", "batch_size",
                 "micro_batch_size", "evals", "eval_tokens", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.seq_len < 2:
        parser.error(f"--seq-len must be >= 2 (one input and one target), got {args.seq_len}")
    if args.batch_size % args.micro_batch_size:
        parser.error(f"--batch-size ({args.batch_size}) must be a multiple of --micro-batch-size "
                     f"({args.micro_batch_size})")
    if args.hidden_size % args.expand_ratio:
        parser.error(f"--hidden-size ({args.hidden_size}) must be divisible by --expand-ratio ({args.expand_ratio})")
    if args.hidden_size % args.head_dim or args.head_dim % 2:
        parser.error(f"--hidden-size ({args.hidden_size}) must be divisible by --head-dim ({args.head_dim}), "
                     f"an even number (RoPE rotates channel pairs)")
    if not args.time_budget > 0:
        parser.error(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    if not 0 <= args.min_lr_ratio <= 1:
        parser.error(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    args.corpus, args.corpus_bytes = "site-packages", int(args.corpus_mb * (1 << 20))
    if args.corpus_bytes < 1:
        parser.error(f"--corpus-mb must be > 0, got {args.corpus_mb}")
    args.cache_dir = str(Path(args.cache_dir).expanduser())
    args.stop_at_step = None
    return parser, args


def build_model(name: str, vocab: int, args) -> nn.Module:
    """Same width, depth, MLP and init; the logits head for all three (the same loss computation)."""
    if name == "transformer":
        return TransformerForCausalLM(TransformerConfig(vocab, args.hidden_size, args.layers,
                                                        args.hidden_size // args.head_dim))
    return HGRN2ForCausalLM(HGRN2Config(vocab_size=vocab, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                                        expand_ratio=1 if name == "hgrn1" else args.expand_ratio))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(model: nn.Module, corpus: train.Corpus, args, rt: train.Dist, autocast,
               steps: int = 4) -> tuple[float, float]:
    """Seconds per training step and per evaluation, after two steps that compile the kernels.
    The optimizer's lr is 0: the weights do not move (the model is built again for training)."""
    opt = torch.optim.AdamW(train.param_groups(model, 0.0), lr=0.0)
    accum = args.batch_size // args.micro_batch_size
    batch = corpus.batches.global_batch(0)
    for i in range(2 + steps):
        if i == 2:
            _sync(rt.device)
            t = time.perf_counter()
        train.train_step(model, model, opt, batch, args, accum, autocast, rt)
    _sync(rt.device)
    step_s = (time.perf_counter() - t) / steps
    t = time.perf_counter()
    train.evaluate(model, corpus.val_seqs, args.micro_batch_size, rt, autocast)
    return step_s, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    t0 = time.perf_counter()
    rt = train.setup(args.device)
    log = lambda *a: tqdm.write(" ".join(map(str, a)), file=sys.stderr)  # noqa: E731
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    autocast = train.autocast_for(args, rt.device)
    try:
        corpus = train.load_data(args, rt, args.tokenizer, log)
    except data.DataError as e:
        parser.error(str(e))
    vocab = 64 * math.ceil(corpus.td.tokenizer.get_vocab_size() / 64)  # matmul-friendly; extra rows never a target

    params = {}
    for name in args.models:
        torch.manual_seed(args.seed)
        params[name] = sum(p.numel() for p in build_model(name, vocab, args).parameters())
    spread = max(params.values()) / min(params.values()) - 1
    if spread > 0.05:
        parser.error(f"parameter counts differ by {spread:.1%} (> 5%): {params}")

    budgeted = args.steps is None
    if budgeted:  # as many steps as the budget allows, the same for every model
        timing = {}
        for name in args.models:
            torch.manual_seed(args.seed)
            timing[name] = time_model(build_model(name, vocab, args).to(rt.device), corpus, args, rt, autocast)
            log(f"{name}: {timing[name][0] * 1e3:.1f} ms per step, {timing[name][1]:.2f} s per evaluation")
        left = args.time_budget - (time.perf_counter() - t0) - 5 * len(args.models)  # 5 s each: setup, plots
        per_step = sum(s for s, _ in timing.values())
        args.steps = int((left - args.evals * sum(e for _, e in timing.values())) / per_step)
        if args.steps < 10:
            parser.error(f"--time-budget {args.time_budget:g} s leaves {max(args.steps, 0)} steps per model after "
                         f"the data ({time.perf_counter() - t0:.0f} s so far); give a larger budget or --steps")
        log(f"{args.steps} steps per model fit the {args.time_budget:g} s budget")
    if args.warmup is None:
        args.warmup = args.steps // 10
    if not 0 <= args.warmup <= args.steps:
        parser.error(f"--warmup must be in [0, --steps={args.steps}], got {args.warmup}")
    args.eval_every = max(1, args.steps // args.evals)
    args.ckpt_every = args.steps  # no checkpoints: fit gets no save()
    # A run that falls far behind its timing (a device shared with other work) stops at this
    # deadline rather than run on; the table then shows the steps each model did.
    deadline = t0 + 1.3 * args.time_budget if budgeted else None

    results = {}
    tokens_per_step = args.batch_size * args.seq_len
    for name in args.models:
        torch.manual_seed(args.seed)
        model = build_model(name, vocab, args).to(rt.device)
        opt, sched = train.make_optimizer(model, args, rt.device)
        metrics = train.Metrics(out / name / "metrics.jsonl", True, None)
        metrics.write(kind="config", step=0, args={k: v for k, v in vars(args).items()}, params=params[name],
                      model=name, unigram_ppl=corpus.unigram)
        t_model = time.perf_counter()
        fit = train.fit(model, model, opt, sched, corpus, args, rt, autocast, metrics, t_start=t_model,
                        deadline=deadline, desc=name)
        results[name] = dict(model=name, label=LABELS[name], params=params[name], steps=fit.done,
                             tokens=fit.done * tokens_per_step, stopped_by=fit.stopped_by,
                             val_loss=fit.val_loss,
                             val_ppl=math.exp(fit.val_loss) if fit.val_loss is not None else None,
                             tok_per_s=round(fit.done * tokens_per_step / max(fit.train_s, 1e-9)),
                             wall_s=round(time.perf_counter() - t_model, 1),
                             curve=[(r["tokens"], r["val_ppl"]) for r in report.read_metrics(metrics.path)
                                    if r["kind"] == "eval"])
        del model, opt
    wall = time.perf_counter() - t0

    device_name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu"
    command = "python examples/compare_lm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = dict(command=command, device=device_name, date=time.strftime("%Y-%m-%d", time.gmtime()),
                wall_s=round(wall, 1), unigram_ppl=corpus.unigram, train_tokens=len(corpus.td.train),
                args={k: v for k, v in vars(args).items()})
    (out / "results.json").write_text(json.dumps(dict(meta=meta, models=list(results.values())), indent=1))
    table = lm_table(results, corpus.unigram, len(corpus.td.train))
    (out / "results.md").write_text(f"Language modelling, {args.layers} layers x {args.hidden_size}, "
                                    f"{len(corpus.td.train) / 1e6:.1f}M training tokens ({meta['date']}, "
                                    f"{device_name}, {wall / 60:.1f} min; `{command}`)\n\n{table}\n")
    report.plot_perplexity({LABELS[n]: r["curve"] for n, r in results.items()}, out / "perplexity.png",
                           title=f"{args.layers} x {args.hidden_size}, {args.steps} steps of "
                                 f"{tokens_per_step:,} tokens")
    print("\n" + table, flush=True)
    print(f"\n{wall / 60:.1f} min; results in {out}/results.md, results.json, perplexity.png", flush=True)
    return 0


def lm_table(results: dict[str, dict], unigram: float, train_tokens: int) -> str:
    """Final and best validation perplexity side by side, with the epochs over the training split: a
    model that repeats its data can pass its best point (overfit) before the end."""
    def ppl(x):
        return "-" if x is None else f"{x:.2f}"
    rows = [[r["label"], f"{r['params'] / 1e6:.2f}M", f"{r['steps']}", f"{r['tokens'] / 1e6:.1f}M",
             f"{r['tokens'] / max(train_tokens, 1):.2f}", ppl(r["val_ppl"]),
             ppl(min((p for _, p in r["curve"]), default=None)), f"{r['tok_per_s']:,}",
             r["stopped_by"] or ""] for r in results.values()]
    rows.append(["unigram baseline", "", "", "", "", f"{unigram:.1f}", "", "", ""])
    return report.markdown_table(["model", "parameters", "steps", "tokens", "epochs", "validation perplexity",
                                  "best on the way", "tokens/s", "stopped early by"], rows)


if __name__ == "__main__":
    sys.exit(main())

"""Train an HGRN2 language model from raw text.

    python examples/train.py                                   # tiny preset, stdlib source, CPU
    python examples/train.py --data books/ --preset small      # your .txt / .jsonl files
    torchrun --nproc_per_node 2 examples/train.py --preset 374M --data corpus.jsonl

With no arguments it trains the tiny preset on the Python standard library's source (no
download), on a 2-core CPU in a few minutes, and ends with the validation perplexity, the
unigram baseline it must beat, and a sample. Outputs go to --out-dir: tokenizer.json, metrics.jsonl,
loss.png (training and validation loss, redrawn at every evaluation) and checkpoints (see
checkpoints.py); stop with Ctrl-C and continue with --resume.

Data parallel: under torchrun every rank computes the same global batch (a function of the
seed and the step) and trains on its own contiguous rows of it; DDP averages the gradients.
Every packed sequence has seq_len - 1 targets, so the mean of the per-micro-batch mean losses is
the true mean over the global batch, and 1 or N processes follow the same trajectory.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, however we're launched
import checkpoints  # noqa: E402
import data  # noqa: E402
import generate  # noqa: E402
import report  # noqa: E402

from hgrn2mini import HGRN2Config, HGRN2ForCausalLM  # noqa: E402
from hgrn2mini.checkpoint import atomic_write_bytes  # noqa: E402

# Training defaults per model preset (the model's sizes are HGRN2Config.from_preset's). Every one
# can be overridden on the command line. tiny: chosen to finish on an idle 2-core CPU in a few
# minutes (benchmarks/RESULTS.md). The larger presets' values are starting points in the
# usual range for models of their size, not tuned here.
PRESETS = {
    "tiny": dict(vocab_size=4096, seq_len=256, batch_size=8, micro_batch_size=4, steps=300, lr=5e-3,
                 warmup=30, eval_every=100, eval_tokens=16384, ckpt_every=100, log_every=1),
    "small": dict(vocab_size=32000, seq_len=1024, batch_size=128, micro_batch_size=16, steps=10000, lr=1e-3,
                  warmup=500, eval_every=500, eval_tokens=1 << 20, ckpt_every=1000, log_every=10),
    "374M": dict(vocab_size=32000, seq_len=2048, batch_size=256, micro_batch_size=8, steps=20000, lr=6e-4,
                 warmup=1000, eval_every=1000, eval_tokens=1 << 21, ckpt_every=1000, log_every=10),
    "1.3B": dict(vocab_size=32000, seq_len=2048, batch_size=256, micro_batch_size=4, steps=50000, lr=4e-4,
                 warmup=2000, eval_every=1000, eval_tokens=1 << 21, ckpt_every=1000, log_every=10),
}
# Settings that shape the trajectory: a resumed run must match the checkpoint on all of them.
RESUME_KEYS = ("preset", "seq_len", "batch_size", "steps", "lr", "min_lr_ratio", "warmup", "schedule",
               "decay_fraction", "weight_decay", "beta1", "beta2", "grad_clip", "seed", "val_fraction")
DEFAULT_PROMPT = "def fibonacci(n):\n"  # fits the default corpus; with --data, a sample starts a new document


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every option's default; an option whose help says its default keeps that text."""

    def _get_help_string(self, action):
        if "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def names_arg(choices: tuple[str, ...]):
    """An argparse type: comma-separated names, each one of `choices`."""

    def parse(text: str) -> list[str]:
        names = text.split(",")
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown name(s) {bad}; choose from {','.join(choices)}")
        return names

    return parse


def _preset_default(key: str) -> str:
    return "(default: --preset's: " + ", ".join(f"{name} {p[key]}" for name, p in PRESETS.items()) + ")"


def add_data_args(g, default_corpus: str = "the Python standard library") -> None:
    """Options of data.prepare(), shared with compare_lm.py."""
    g.add_argument("--data", nargs="*", default=None,
                   help=f"text files, .jsonl files, folders of them (default: {default_corpus})")
    g.add_argument("--jsonl-key", default="text", help="field holding the text in .jsonl lines")
    g.add_argument("--tokenizer", default=None, help="existing tokenizer.json (default: train a byte-level BPE)")
    g.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out")
    g.add_argument("--doc-chars", type=int, default=100_000, help="longer documents are cut at lines")
    g.add_argument("--cache-dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "hgrn2mini"),
                   help="tokenized data and trained tokenizers, reused when the inputs are unchanged")


def add_optimization_args(g, defaults: dict | None = None, notes: dict | None = None) -> None:
    """The schedule and optimizer options, shared with compare_lm.py. Without `defaults`, the
    options that a preset sets default to None and their help names the presets' values; `notes`
    replaces the shown default of an option where its value is decided later."""

    def default(key):
        if defaults is None:
            return None, _preset_default(key)
        return defaults[key], (notes or {}).get(key, "")

    for flag, key, kind, text in (
        ("--vocab-size", "vocab_size", int, "BPE vocabulary to train"),
        ("--seq-len", "seq_len", int, "tokens per sequence"),
        ("--batch-size", "batch_size", int, "global batch, in sequences"),
        ("--micro-batch-size", "micro_batch_size", int, "sequences per forward on each rank"),
        ("--steps", "steps", int, "optimizer steps"),
        ("--lr", "lr", float, "peak learning rate"),
        ("--warmup", "warmup", int, "linear warm-up steps (a preset's: at most a tenth of --steps)"),
    ):
        value, help_default = default(key)
        g.add_argument(flag, type=kind, default=value, help=f"{text} {help_default}".strip())
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr")
    g.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine",
                   help="after warm-up: cosine decay, or warmup-stable-decay (linear decay at the end)")
    g.add_argument("--decay-fraction", type=float, default=0.2, help="WSD: share of steps spent decaying")
    g.add_argument("--weight-decay", type=float, default=0.1, help="on Linear weight matrices only")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW's beta1")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW's beta2")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=0, help="split, data order and initialization")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="tiny", help="model size and training defaults")
    add_data_args(p.add_argument_group("data"))
    add_optimization_args(p.add_argument_group("optimization"))
    g = p.add_argument_group("run")
    g.add_argument("--out-dir", default=None, help="(default: out/<preset>)")
    g.add_argument("--resume", action="store_true", help="continue from --out-dir's latest checkpoint")
    for flag, key, text in (("--eval-every", "eval_every", "steps between validation runs"),
                            ("--eval-tokens", "eval_tokens", "validation tokens per evaluation"),
                            ("--ckpt-every", "ckpt_every", "steps between checkpoints"),
                            ("--log-every", "log_every",
                             "steps between metric writes (each one waits for the device)")):
        g.add_argument(flag, type=int, default=None, help=f"{text} {_preset_default(key)}")
    g.add_argument("--stop-at-step", type=int, default=None,
                   help="checkpoint and exit after this step, as if stopped, for time-limited jobs (default: none, run "
                        "to --steps)")
    g.add_argument("--device", default=None, help="(default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--compile", choices=["auto", "model", "regions", "off"], default="auto",
                   help="torch.compile each block on its own (regions: a much shorter first step than the "
                        "whole model's, for a few %% fewer tokens/s), the whole model, or not at all; auto: "
                        "regions on CUDA, off on CPU")
    g.add_argument("--no-compile", action="store_true", help="same as --compile off")
    g.add_argument("--prompt", default=None,
                   help=f"prompt of the final sample (default: {DEFAULT_PROMPT!r} on the default corpus, "
                        f"none with --data)")
    g.add_argument("--sample-tokens", type=int, default=120, help="length of the final sample (0: none)")
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    warmup_given = args.warmup is not None
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not warmup_given:  # the preset's warm-up, but never more than a tenth of a shortened run
        args.warmup = min(args.warmup, args.steps // 10)
    args.out_dir = args.out_dir or os.path.join("out", args.preset)
    args.cache_dir = os.path.expanduser(args.cache_dir)
    for name in ("seq_len", "batch_size", "micro_batch_size", "steps", "eval_every", "eval_tokens",
                 "ckpt_every", "log_every", "vocab_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seq_len < 2:
        parser.error(f"--seq-len must be >= 2 (one input and one target), got {args.seq_len}")
    if not 0 <= args.warmup <= args.steps:
        parser.error(f"--warmup must be in [0, --steps={args.steps}], got {args.warmup}")
    if not 0 < args.decay_fraction <= 1:
        parser.error(f"--decay-fraction must be in (0, 1], got {args.decay_fraction}")
    if not 0 <= args.min_lr_ratio <= 1:
        parser.error(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    return parser, args


# ---------------------------------------------------------------------------------------------
# Processes and devices
# ---------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)  # SUM: gloo has no AVG
        return t


def setup(device_arg: str | None) -> Dist:
    """One process, or one rank of torchrun (its env: RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for any matmul left outside autocast
    if world == 1:
        return Dist(0, 1, device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), world, device)


class StopSignal:
    """SIGINT / SIGTERM ask for a checkpoint and a clean exit after the current step.
    A second Ctrl-C stops at once."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
              f"(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the Linear weight matrices only. Not norms, not the lower-bound parameter (2-D, but
    a gate bias in effect), not the embedding: a rare token's row gets a gradient rarely and
    would only shrink (with tied embeddings the head is the embedding and is not decayed either)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - embeddings
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    return [
        {"params": [p for p in params if id(p) in linear], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in linear], "weight_decay": 0.0},
    ]


def lr_schedule(args):
    """Multiplier of the peak lr for optimizer step `step` (0-based)."""

    def factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        if args.schedule == "cosine":
            progress = (step - args.warmup) / max(1, args.steps - args.warmup)
            return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_steps = max(1, round(args.decay_fraction * args.steps))
        into = step - (args.steps - decay_steps)
        if into < 0:
            return 1.0
        return 1 - (1 - args.min_lr_ratio) * min(1.0, (into + 1) / decay_steps)

    return factor


# ---------------------------------------------------------------------------------------------
# Evaluation and logging
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, seqs: np.ndarray, micro_batch: int, rt: Dist, autocast) -> float:
    """Mean validation loss over every target of seqs, the rows split across ranks."""
    model.eval()
    rows = seqs[rt.rank :: rt.world]
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)  # [sum of losses, number of targets]
    for i in range(0, len(rows), micro_batch):
        x = torch.from_numpy(rows[i : i + micro_batch].astype(np.int64)).to(rt.device)
        with autocast:
            loss = model(x, labels=x).loss
        n = x.shape[0] * (x.shape[1] - 1)
        total += torch.stack([loss.double() * n, torch.tensor(float(n), dtype=torch.float64, device=rt.device)])
    model.train()
    rt.all_reduce_sum(total)
    return (total[0] / total[1]).item()


class Metrics:
    """metrics.jsonl, one JSON object a line, and its plot loss.png beside it; written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        self.png = path.with_name("loss.png")
        if enabled and resume_step is not None and path.is_file():
            # Steps after the checkpoint will be run (and logged) again: drop their old lines.
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            keep = [r for r in records if r["step"] <= resume_step and r["kind"] != "final"]
            atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())
        elif enabled and resume_step is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def write(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        """Training and validation loss so far, as loss.png."""
        if self.enabled:
            report.plot_losses(self.path, self.png)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def train_step(train_model, model, opt, rows: np.ndarray, args, accum: int, autocast, rt: Dist):
    """One optimizer step on this rank's rows of the global batch; returns (mean loss, grad norm) as
    device tensors, without waiting for the device."""
    x_all = torch.from_numpy(rows.astype(np.int64))
    if rt.device.type == "cuda":
        x_all = x_all.pin_memory()  # so that the copies below overlap the previous step's work
    loss_sum = torch.zeros((), device=rt.device)
    for i in range(accum):
        x = x_all[i * args.micro_batch_size : (i + 1) * args.micro_batch_size].to(rt.device, non_blocking=True)
        # DDP all-reduces the gradients on the last micro-batch only.
        sync = rt.world == 1 or i == accum - 1
        with contextlib.nullcontext() if sync else train_model.no_sync():
            with autocast:
                loss = train_model(x, labels=x).loss / accum
            loss.backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def gather_interval(pending: list, stop_here: bool, rt: Dist) -> tuple[list[float], list[float], bool]:
    """The global mean loss of each pending step, its gradient norm (the same on every rank, as the
    gradients were all-reduced) and whether any rank was asked to stop: one collective, one sync."""
    flag = torch.tensor([float(stop_here)], device=rt.device)
    packed = rt.all_reduce_sum(torch.cat([torch.stack([p[1] for p in pending]), flag]))
    losses = (packed[:-1] / rt.world).tolist()
    grad_norms = torch.stack([p[2] for p in pending]).tolist()
    return losses, grad_norms, packed[-1].item() > 0


def prepare_data(args, rt: Dist, tokenizer: str | None, log) -> data.TokenData:
    """Rank 0 tokenizes (and trains the tokenizer); the other ranks then read its cache."""
    kwargs = dict(cache_dir=args.cache_dir, vocab_size=args.vocab_size, tokenizer=tokenizer,
                  val_fraction=args.val_fraction, seed=args.seed, doc_chars=args.doc_chars,
                  jsonl_key=args.jsonl_key)
    if getattr(args, "corpus", None) is not None:  # compare_lm.py's default corpus; train.py's is the stdlib
        kwargs.update(corpus=args.corpus, corpus_bytes=args.corpus_bytes)
    td, error = None, None
    if rt.main:
        try:
            td = data.prepare(args.data, log=log, **kwargs)
        except data.DataError as e:
            error = str(e)
    if rt.world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)  # every rank must fail together, not hang
        error = box[0]
    if error is not None:
        raise data.DataError(error)
    if not rt.main:
        td = data.prepare(args.data, log=lambda *a: None, **kwargs)
    return td


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    t_start = time.perf_counter()
    rt = setup(args.device)
    try:
        return run(parser, args, rt, t_start)
    finally:
        if rt.world > 1:
            dist.destroy_process_group()


@dataclass
class Corpus:
    """The token data of a run: what load_data gives train.py and compare_lm.py."""

    td: data.TokenData
    batches: data.PackedBatches  # global batch i: a function of (seed, i)
    val_seqs: np.ndarray  # [N, seq_len], the validation sequences evaluated
    unigram: float  # the unigram baseline's validation perplexity
    n_train_seqs: int


def load_data(args, rt: Dist, tokenizer: str | None, log) -> Corpus:
    """Documents to packed train / validation sequences (data.prepare), and the unigram baseline.
    Raises data.DataError on bad input."""
    td = prepare_data(args, rt, tokenizer, log)
    train_seqs = data.pack(td.train, args.seq_len, "train")
    val_seqs = data.pack(td.val, args.seq_len, "validation")
    val_seqs = val_seqs[: max(1, math.ceil(args.eval_tokens / args.seq_len))]
    unigram = data.unigram_perplexity(td.train, val_seqs[:, 1:], td.tokenizer.get_vocab_size())
    log(f"data: {len(td.train):,} train tokens ({td.n_train_docs} docs, {len(train_seqs)} sequences of "
        f"{args.seq_len}), {len(td.val):,} validation tokens ({td.n_val_docs} docs; {val_seqs.size:,} evaluated)")
    log(f"unigram baseline: validation perplexity {unigram:.1f} (training-split token frequencies, add-one)")
    return Corpus(td, data.PackedBatches(train_seqs, args.batch_size, args.seed), val_seqs, unigram, len(train_seqs))


def make_optimizer(model: nn.Module, args, device: torch.device):
    """AdamW (weight decay on Linear weights only) and the warm-up + decay schedule of args."""
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(args.beta1, args.beta2),
                            fused=device.type == "cuda")
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(args))


def autocast_for(args, device: torch.device):
    """bf16 autocast (default on CUDA) or none (fp32, default on CPU)."""
    use_bf16 = (args.dtype or ("bfloat16" if device.type == "cuda" else "float32")) == "bfloat16"
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


@dataclass
class FitResult:
    val_loss: float | None  # the last evaluation's, None if none ran
    done: int  # optimizer steps done
    stopped_by: str | None  # why it stopped before args.steps: a signal, --stop-at-step, the deadline
    train_s: float  # time in training steps (evaluations and checkpoints not counted)


def fit(train_model, model, opt, sched, corpus: Corpus, args, rt: Dist, autocast, metrics: Metrics, *,
        t_start: float, start: int = 0, stop: StopSignal | None = None, save=None, deadline: float | None = None,
        desc: str | None = None) -> FitResult:
    """The training loop from step `start` to args.steps: metrics every args.log_every steps (one host
    sync each), evaluation (and the loss plot) every args.eval_every, `save(step)` every
    args.ckpt_every and when stopped. Stops early on a signal (`stop`), at args.stop_at_step, or
    once time.perf_counter() passes `deadline`."""
    accum = args.batch_size // (rt.world * args.micro_batch_size)
    tokens_per_step = args.batch_size * args.seq_len
    stop_at = getattr(args, "stop_at_step", None)
    bar = tqdm(total=args.steps, initial=start, disable=not rt.main, unit="step", dynamic_ncols=True, desc=desc)
    pending = []  # (step, loss, grad_norm, lr), the tensors left on the device until the next write
    val_loss, stopped_by, done, train_s = None, None, start, 0.0
    t_last, step_last = time.perf_counter(), start
    for step in range(start, args.steps):
        rows = data.shard(corpus.batches.global_batch(step), rt.rank, rt.world)  # [B / world, T]
        lr = sched.get_last_lr()[0]
        loss, grad_norm = train_step(train_model, model, opt, rows, args, accum, autocast, rt)
        sched.step()
        done = step + 1
        bar.update(1)
        pending.append((done, loss, grad_norm, lr))

        last = done == args.steps
        late = deadline is not None and time.perf_counter() > deadline
        if not (last or late or done == stop_at
                or any(done % every == 0 for every in (args.log_every, args.eval_every, args.ckpt_every))):
            continue
        # The one host sync of the interval: losses, gradient norms and every rank's stop flag.
        losses, grad_norms, stop_requested = gather_interval(pending, stop is not None and stop.signum is not None, rt)
        now = time.perf_counter()
        train_s += now - t_last
        tok_s = tokens_per_step * (done - step_last) / (now - t_last)
        # Peak memory on this rank so far (CUDA): what decides the largest micro-batch.
        mem = {"peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3)} if rt.device.type == "cuda" else {}
        for (s, _, _, lr_s), loss_s, gn in zip(pending, losses, grad_norms):
            metrics.write(kind="train", step=s, loss=loss_s, lr=lr_s, grad_norm=gn, tokens=s * tokens_per_step,
                          epoch=round(corpus.batches.epochs(s), 4), tok_per_s=round(tok_s),
                          elapsed_s=round(now - t_start, 2), **mem)
        pending.clear()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        if stop_requested or done == stop_at or late:
            stopped_by = (signal.Signals(stop.signum).name if stop is not None and stop.signum
                          else "a signal to another rank" if stop_requested
                          else "--stop-at-step" if done == stop_at else "the time budget")
        if done % args.eval_every == 0 or last or late:
            val_loss = evaluate(model, corpus.val_seqs, args.micro_batch_size, rt, autocast)
            metrics.write(kind="eval", step=done, val_loss=val_loss, val_ppl=math.exp(val_loss),
                          tokens=done * tokens_per_step)
            if rt.main:
                tqdm.write(f"step {done}: validation loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f}",
                           file=sys.stderr)
            metrics.plot()
        if stopped_by is not None:
            if save is not None:
                save(done)
            metrics.plot()
            break
        if save is not None and (done % args.ckpt_every == 0 or last):
            save(done)
        t_last, step_last = time.perf_counter(), done  # evaluation and checkpoints are not training time
    bar.close()
    return FitResult(val_loss, done, stopped_by, train_s)


def run(parser, args, rt: Dist, t_start: float) -> int:
    log = (lambda *a: tqdm.write(" ".join(map(str, a)), file=sys.stderr)) if rt.main else (lambda *a: None)
    out = Path(args.out_dir)
    if args.batch_size % (rt.world * args.micro_batch_size):
        parser.error(f"--batch-size ({args.batch_size}) must be a multiple of world size ({rt.world}) x "
                     f"--micro-batch-size ({args.micro_batch_size})")
    autocast = autocast_for(args, rt.device)

    # -- resume: what the checkpoint says ------------------------------------------------------
    ckpt, state = None, None
    if not args.resume and (out / checkpoints.LATEST).is_file():
        log(f"warning: {out} holds a checkpoint that this run will replace; --resume continues it instead")
    if args.resume:
        ckpt = checkpoints.latest(out)
        if ckpt is None:
            parser.error(f"--resume: no checkpoint in --out-dir {str(out)!r} (no 'latest' file)")
        state = checkpoints.load_state(ckpt)
        diffs = [f"--{k.replace('_', '-')} was {state['args'][k]!r}, got {getattr(args, k)!r}"
                 for k in RESUME_KEYS if state["args"][k] != getattr(args, k)]
        if diffs:
            parser.error("--resume: settings differ from the checkpoint's: " + "; ".join(diffs))

    # -- data --------------------------------------------------------------------------------------
    tokenizer_path = args.tokenizer or (str(ckpt / checkpoints.TOKENIZER) if ckpt else None)
    try:
        corpus = load_data(args, rt, tokenizer_path, log)
    except data.DataError as e:
        parser.error(str(e))
    td = corpus.td
    if state is not None and state["data_key"] != td.key:
        parser.error(f"--resume: the data or tokenizer changed since the checkpoint "
                     f"(key {state['data_key']} then, {td.key} now)")
    vocab = td.tokenizer.get_vocab_size()
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / checkpoints.TOKENIZER, td.tokenizer.to_str().encode())

    # -- model and optimizer ---------------------------------------------------------------------
    # Padded to a multiple of 64 for the matmul shapes; the extra rows are never a target. The loss
    # without the [tokens, vocab] logits (`fuse_linear_cross_entropy`): less peak memory at the
    # same speed.
    config = HGRN2Config.from_preset(args.preset, vocab_size=64 * math.ceil(vocab / 64), fuse_linear_cross_entropy=True)
    torch.manual_seed(args.seed)
    if ckpt is not None:
        model = HGRN2ForCausalLM.from_pretrained(ckpt, device=rt.device)
        # The loss head is how this run trains, not part of the model: a checkpoint written with the
        # other one (an earlier version, or fla's config.json) resumes with this run's.
        model.config.fuse_linear_cross_entropy = config.fuse_linear_cross_entropy
        if model.config != config:
            parser.error(f"--resume: the checkpoint's model config differs from --preset {args.preset}'s")
    else:
        model = HGRN2ForCausalLM(config).to(rt.device)
    n_params = sum(p.numel() for p in model.parameters())
    accum = args.batch_size // (rt.world * args.micro_batch_size)
    log(f"model: {args.preset}, {n_params / 1e6:.2f}M parameters, vocab {config.vocab_size}; "
        f"{rt.world} process(es) on {rt.device.type}, batch {args.batch_size} x {args.seq_len} = "
        f"{args.batch_size * args.seq_len:,} tokens/step ({accum} micro-batch(es) of {args.micro_batch_size} per rank)")
    opt, sched = make_optimizer(model, args, rt.device)
    start = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["step"]
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        if rt.device.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        log(f"resumed from {ckpt} at step {start}")

    train_model = model
    compile_mode = "off" if args.no_compile else args.compile
    if compile_mode == "auto":
        compile_mode = "regions" if rt.device.type == "cuda" else "off"
    if compile_mode == "model":
        train_model = torch.compile(model)  # the first step pays the compilation
    elif compile_mode == "regions":
        # In place: evaluation and the final sample run through the compiled blocks too.
        model.compile_regions()
    if rt.world > 1:
        # Compiled inside, DDP outside: DDP's bucketed all-reduce overlaps the compiled backward.
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=ids)

    metrics = Metrics(out / "metrics.jsonl", rt.main, start if state else None)
    if rt.main and state is None:
        metrics.write(kind="config", step=0, args=vars(args), params=n_params, world=rt.world,
                      unigram_ppl=corpus.unigram)

    def save(step: int) -> None:
        if not rt.main:
            return
        st = {
            "step": step,
            "samples_seen": step * args.batch_size,  # the data position: batches are a function of it
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if rt.device.type == "cuda" else []},
            "args": {k: getattr(args, k) for k in RESUME_KEYS},
            "data_key": td.key,
        }
        path = checkpoints.save(out, step, model, td.tokenizer.to_str(), st)
        log(f"checkpoint: {path}")

    # -- the loop ------------------------------------------------------------------------------------
    with StopSignal() as stop:
        result = fit(train_model, model, opt, sched, corpus, args, rt, autocast, metrics, t_start=t_start,
                     start=start, stop=stop, save=save)
    val_loss = result.val_loss
    if result.stopped_by is not None:
        log(f"stopped by {result.stopped_by} after step {result.done}; continue with the same command and --resume")
        return 0
    if val_loss is None:  # resumed from the final checkpoint: nothing left to train
        val_loss = evaluate(model, corpus.val_seqs, args.micro_batch_size, rt, autocast)

    # -- the end: perplexity against the baseline, a sample ---------------------------------------------
    wall = time.perf_counter() - t_start
    weights_identical = ranks_agree(model, rt) if rt.world > 1 else None
    ppl = math.exp(val_loss)
    metrics.write(kind="final", step=args.steps, val_ppl=ppl, unigram_ppl=corpus.unigram, wall_s=round(wall, 1),
                  ranks_weights_identical=weights_identical)
    if rt.main:
        print(f"\nvalidation perplexity {ppl:.2f} (unigram baseline {corpus.unigram:.1f}) after {args.steps} steps, "
              f"{wall / 60:.1f} min; loss plot: {metrics.png}", flush=True)
        if args.sample_tokens > 0:
            prompt = args.prompt if args.prompt is not None else (DEFAULT_PROMPT if not args.data else "")
            print("sample:\n" + prompt, end="", flush=True)
            gen = torch.Generator(rt.device).manual_seed(args.seed)
            for piece in generate.stream(model.eval(), td.tokenizer, prompt, args.sample_tokens,
                                         temperature=0.8, top_k=50, generator=gen):
                print(piece, end="", flush=True)
            print(flush=True)
    return 0


def ranks_agree(model: nn.Module, rt: Dist) -> bool:
    """True when every rank holds bit-identical weights (DDP keeps them so; this checks it)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = [None] * rt.world
    dist.all_gather_object(digests, h.hexdigest())
    if len(set(digests)) != 1:
        print(f"warning: ranks' weights differ: {digests}", file=sys.stderr)
    return len(set(digests)) == 1


if __name__ == "__main__":
    sys.exit(main())

"""Sequence classification on a time budget, shared by lra.py and image.py: the three models
(bidirectional HGRN2, the same at expand_ratio 1, a softmax-attention baseline of the same width),
a training loop that stops at a deadline, parallel runs as subprocesses, and the report (a
Markdown table, JSON and a PNG plot).

Every run reads the same token sequences: [N, T] int64 ids, 0-padded on the right, with their
lengths; the classifier pools over the tokens (attention_mask) and predicts one of num_labels.

On CUDA the training step is captured in a CUDA graph after 3 eager steps and replayed
(graphstep.py; --no-graph: eager steps): its batches then have static shapes, every one padded to
the data's full width (with a mask wherever some sequence is shorter), where eager batches are cut
at their longest sequence.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import graphstep
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hgrn2mini import HGRN2Config, HGRN2ForSequenceClassification, SequenceClassifierOutput
from hgrn2mini.model import HGRN2MLP, RMSNorm

MODELS = ("hgrn2", "hgrn2-k1", "attention")
LABELS = {"hgrn2": "HGRN2 (bidirectional)", "hgrn2-k1": "HGRN2, expand_ratio 1 (HGRN1-like)",
          "attention": "softmax attention (SDPA)"}


# ----------------------------------------------------------------------------------------------
# The softmax-attention baseline: the same pre-norm block as HGRN2 with SDPA as the token mixer
# ----------------------------------------------------------------------------------------------


class AttentionBlock(nn.Module):
    def __init__(self, config: HGRN2Config):
        super().__init__()
        D = config.hidden_size
        self.heads = config.num_heads
        self.attn_norm, self.mlp_norm = RMSNorm(D, config.norm_eps), RMSNorm(D, config.norm_eps)
        self.qkv = nn.Linear(D, 3 * D, bias=False)  # 3 D^2 + D^2: the parameters of HGRN2's mixer
        self.o_proj = nn.Linear(D, D, bias=False)
        self.mlp = HGRN2MLP(config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(B, T, 3, self.heads, D // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=key_mask)  # [B, H, T, D/H], not causal
        x = x + self.o_proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.mlp_norm(x))


class AttentionClassifier(nn.Module):
    """ViT-style encoder: token and learned position embeddings, a class token in front, pre-norm
    softmax-attention blocks (bidirectional), a linear head on the class token."""

    def __init__(self, config: HGRN2Config, max_len: int):
        super().__init__()
        D = config.hidden_size
        self.embeddings = nn.Embedding(config.vocab_size, D)
        self.positions = nn.Parameter(torch.zeros(max_len + 1, D))
        self.cls = nn.Parameter(torch.zeros(D))
        self.layers = nn.ModuleList(AttentionBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(D, config.norm_eps)
        self.score = nn.Linear(D, config.num_labels, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=config.initializer_range)
        nn.init.normal_(self.positions, std=config.initializer_range)

    def forward(self, input_ids, labels=None, attention_mask=None) -> SequenceClassifierOutput:
        B, T = input_ids.shape
        x = torch.cat([self.cls.expand(B, 1, -1), self.embeddings(input_ids)], 1) + self.positions[: T + 1]
        key_mask = None
        if attention_mask is not None:  # [B, 1, 1, 1 + T]: every query sees the class token and the tokens
            key_mask = F.pad(attention_mask.bool(), (1, 0), value=True)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, key_mask)
        logits = self.score(self.norm(x[:, 0]))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss, logits)


def build_model(kind: str, vocab_size: int, num_labels: int, max_len: int, args) -> nn.Module:
    """HGRN2 with expand_ratio args.expand_ratio (K), the same with K = 1, or the attention
    baseline with as many heads as HGRN2; all of width args.width and depth args.layers."""
    if kind not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {kind!r}")
    K = 1 if kind == "hgrn2-k1" else args.expand_ratio
    config = HGRN2Config(vocab_size=vocab_size, hidden_size=args.width, num_hidden_layers=args.layers,
                         expand_ratio=K, bidirectional=True, num_labels=num_labels, tie_word_embeddings=False)
    if kind == "attention":  # num_heads = D / K, the heads of HGRN2
        return AttentionClassifier(config, max_len)
    return HGRN2ForSequenceClassification(config)


def parser(doc: str, out: str, budget: float, width: int, layers: int, expand_ratio: int,
           jobs: int) -> argparse.ArgumentParser:
    """The arguments every example takes: output folder, time budget, the models and training."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=out, help="output folder")
    p.add_argument("--time-budget", type=float, default=budget,
                   help="seconds of wall clock for everything: data, every run, the report")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="models to train")
    p.add_argument("--width", type=int, default=width, help="hidden size D of every model")
    p.add_argument("--layers", type=int, default=layers, help="blocks of every model")
    p.add_argument("--expand-ratio", type=int, default=expand_ratio,
                   help="HGRN2's K (head key dim); also sets the attention heads, D / K")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop a run after this many steps; None: at the deadline only")
    p.add_argument("--jobs", type=int, default=jobs, help="runs in parallel, as subprocesses (1: in this process)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the training step in a CUDA graph (default: on CUDA; eager elsewhere)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data sets, the init and the batches")
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)  # one run, in a subprocess of run_all
    return p


def main(p: argparse.ArgumentParser, argv: list[str] | None, start: float, script: str, title: str,
         make_data, check=None) -> str:
    """Parses argv, makes the data sets (make_data(args, out) -> {task: .npz path}), runs every
    task with every model by start + --time-budget, writes the report; returns its table."""
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args)
        return ""
    check_args(args, p)
    if check is not None:
        check(args, p)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    start = start if argv is None else time.time()  # called as a function: the budget runs from the call
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(args, out)
    print(f"data sets ready at {time.time() - start:.1f} s", flush=True)
    runs = [(task, kind) for task in data for kind in args.models]
    results = run_all(runs, data, args, script, start + args.time_budget - 5.0)  # 5 s for the report
    table = report(results, out, title, f"python examples/{Path(script).name} " + " ".join(args.argv))
    print(table)
    print(f"total {time.time() - start:.0f} s; results in {out}")
    return table


def check_args(args, p: argparse.ArgumentParser) -> None:
    for name in ("width", "layers", "expand_ratio", "batch_size", "jobs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.width % args.expand_ratio:
        p.error(f"--width ({args.width}) must be divisible by --expand-ratio ({args.expand_ratio})")
    if not args.time_budget > 0:
        p.error(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    if args.max_steps is not None and args.max_steps < 1:
        p.error(f"--max-steps must be >= 1, got {args.max_steps}")
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if args.graph and not args.device.startswith("cuda"):
        p.error(f"--graph needs a CUDA --device, got {args.device}")


# ----------------------------------------------------------------------------------------------
# One run: train until the deadline, then accuracy on the held-out set
# ----------------------------------------------------------------------------------------------


def _batch(ids, lengths, labels, index, device, width=None, masked=False):
    """(ids [B, T], labels [B], mask [B, T] or None) of the examples `index`, on device. T is the
    batch's longest sequence, with a mask where one is shorter; or, for static shapes, `width`,
    with a mask whenever `masked`."""
    T = int(lengths[index].max()) if width is None else width
    x = torch.from_numpy(ids[index, :T]).to(device)
    y = torch.from_numpy(labels[index]).to(device)
    padded = bool((lengths[index] < T).any()) if width is None else masked
    mask = (torch.arange(T, device=device) < torch.from_numpy(lengths[index]).to(device)[:, None]) if padded else None
    return x, y, mask


def classifier_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    """The classifier's loss on a batch (ids, labels, mask or None), as graphstep.TrainStep calls it."""
    x, y, mask = batch
    return model(x, labels=y, attention_mask=mask).loss


def train_one(task: str, kind: str, data: dict, args, deadline: float) -> dict:
    """Trains model `kind` on data['train_*'] and reports accuracy on data['test_*'], all done by
    `deadline` (time.time(); the process start, setup and the first kernels' compilation count)."""
    start, seconds = time.time(), deadline - time.time()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train_ids, train_len, train_y = data["train_ids"], data["train_len"], data["train_y"]
    model = build_model(kind, int(data["vocab_size"]), int(data["num_labels"]), train_ids.shape[1], args).to(device)
    opt = graphstep.make_optimizer([{"params": list(model.parameters()), "weight_decay": args.weight_decay}],
                                   args.lr, (0.9, 0.98), device)
    # bf16 autocast on CUDA: the HGRN2 op and SDPA take their bf16 kernels.
    graph = device.type == "cuda" if args.graph is None else args.graph  # --graph's default
    train_step = graphstep.TrainStep(model, opt, classifier_loss, graph=graph,
                                     autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    autocast = train_step.autocast()
    # A captured step's batches: the full width, a mask whenever some training sequence is shorter.
    width = train_ids.shape[1] if graph else None
    masked = bool((train_len < train_ids.shape[1]).any())
    rng = np.random.default_rng(args.seed)
    train_end = deadline - min(0.15 * seconds, 20.0)  # the rest for the held-out pass
    log, step, seen = graphstep.LossLog(), 0, 0
    model.train()
    while time.time() < train_end and (args.max_steps is None or step < args.max_steps):
        # LR: linear warm-up over the first 5% of the time, cosine to 10% by the deadline.
        frac = (time.time() - start) / max(train_end - start, 1e-3)
        graphstep.set_lr(opt, graphstep.warmup_cosine(args.lr, frac, 0.05))
        index = rng.integers(0, len(train_ids), args.batch_size)
        loss = train_step(_batch(train_ids, train_len, train_y, index, device, width, masked))
        step, seen = train_step.steps, seen + len(index)
        if step % 25 == 1:
            log.record(round(time.time() - start, 2), loss)  # read back at the next record: no per-step sync
    graphstep.synchronize(device)
    train_seconds = time.time() - start
    curve = log.result()
    correct = total = 0
    model.eval()
    test_ids, test_len, test_y = data["test_ids"], data["test_len"], data["test_y"]
    with torch.no_grad():
        for i in range(0, len(test_ids), args.batch_size):
            if time.time() > deadline and total > 0:
                break  # the budget is spent: report on the part evaluated
            index = np.arange(i, min(i + args.batch_size, len(test_ids)))
            x, y, mask = _batch(test_ids, test_len, test_y, index, device)
            with autocast:
                logits = model(x, attention_mask=mask).logits
            correct += int((logits.argmax(-1) == y).sum())
            total += len(index)
    return dict(task=task, model=kind, label=LABELS[kind], params=sum(p.numel() for p in model.parameters()),
                steps=step, examples_seen=seen, train_seconds=round(train_seconds, 1),
                steps_per_s=round(step / train_seconds, 1), captured=train_step.captured,
                capture_error=train_step.capture_error,
                seconds=round(time.time() - start, 1), test_accuracy=correct / max(total, 1),
                test_examples=total, final_train_loss=curve[-1][1] if curve else None, curve=curve,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")


# ----------------------------------------------------------------------------------------------
# Runs in parallel and the report
# ----------------------------------------------------------------------------------------------


def run_all(runs: list[tuple[str, str]], data_paths: dict[str, Path], args, script: str, deadline: float) -> list[dict]:
    """Every (task, model) run, args.jobs at a time as subprocesses of `script --worker`, the
    waves sharing the time to `deadline` (time.time()) equally; with jobs 1 they run here, one
    after the other, each with an equal share."""
    jobs = min(args.jobs, len(runs))
    waves = math.ceil(len(runs) / jobs)
    share = (deadline - time.time()) / waves
    print(f"{len(runs)} runs, {jobs} at a time: {share:.0f} s each", flush=True)
    results, pending = [], list(runs)
    for wave in range(waves):
        batch, pending = pending[:jobs], pending[jobs:]
        end = deadline - (waves - wave - 1) * share
        if jobs == 1:
            (task, kind), = batch
            results.append(train_one(task, kind, dict(np.load(data_paths[task])), args, end))
            continue
        procs = []
        for task, kind in batch:
            result = Path(args.out) / f"run_{task}_{kind}.json"
            cmd = [sys.executable, script, *args.argv, "--worker", task, kind, str(data_paths[task]),
                   str(result), repr(end)]
            procs.append((subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}), result, task, kind))
        for proc, result, task, kind in procs:
            try:
                proc.wait(timeout=max(end - time.time(), 0) + 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.returncode != 0 or not result.is_file():
                raise RuntimeError(f"run {task} / {kind} failed (exit status {proc.returncode}); see its output above")
            results.append(json.loads(result.read_text()))
    return results


def worker(argv_tail: list[str], args) -> None:
    task, kind, data_path, result, deadline = argv_tail
    # The runs share the host's cores: without a share each, their threads spin against each other.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.jobs))
    out = train_one(task, kind, dict(np.load(data_path)), args, float(deadline))
    Path(result).write_text(json.dumps(out))


def report(results: list[dict], out: Path, title: str, command: str) -> str:
    """results.json, results.md and results.png in out; returns the Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"title": title, "command": command, "runs": results}, indent=1))
    lines = ["| task | model | params | steps | examples seen | train s | held-out accuracy (n) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['task']} | {r['label']} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['examples_seen']} "
                     f"| {r['train_seconds']} | {100 * r['test_accuracy']:.1f}% ({r['test_examples']}) |")
    table = "\n".join(lines)
    device = results[0]["device"] if results else "?"
    (out / "results.md").write_text(f"# {title}\n\n{time.strftime('%Y-%m-%d')}, {device}: `{command}`\n\n{table}\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(5 * (len(tasks) + 1), 4))
    colors = {kind: f"C{i}" for i, kind in enumerate(MODELS)}
    for ax, task in zip(axes[:-1], tasks):
        for r in results:
            if r["task"] == task and r["curve"]:
                t, loss = zip(*r["curve"])
                ax.plot(t, loss, color=colors[r["model"]], label=r["label"])
        ax.set(title=f"{task}: training loss", xlabel="seconds", ylabel="cross-entropy")
        if ax.get_lines():
            ax.legend(fontsize=7)
    ax, width = axes[-1], 0.8 / len(MODELS)
    for i, kind in enumerate(MODELS):
        acc = {r["task"]: 100 * r["test_accuracy"] for r in results if r["model"] == kind}
        acc = [acc.get(t, 0) for t in tasks]
        ax.bar(np.arange(len(tasks)) + i * width, acc, width, color=colors[kind], label=LABELS[kind])
    ax.set_xticks(np.arange(len(tasks)) + width, tasks)
    ax.set(title="held-out accuracy", ylabel="%", ylim=(0, 100))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)
    plt.close(fig)
    return table

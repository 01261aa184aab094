"""Multi-query associative recall (MQAR): does HGRN2's expanded state buy recall?

    python examples/mqar.py --out out/mqar                      # the full sweep, ~7 min on one H200
    python examples/mqar.py --d-models 64 --settings 64:4 --jobs 4 --time-budget 60   # a quick look

The task as in zoology (Arora et al. 2023): an example lists `pairs` key-value pairs
(k1 v1 k2 v2 ...), then asks for every key again, once each, at random places in the rest of the
sequence (the gaps drawn from zoology's power law, near the pairs more often); the model must
output the key's value there. Keys come from the lower half of the vocabulary, unique within an
example; values from the upper half; the filler token is 0. The loss and the accuracy count only
the answers. Training examples are generated on the fly from --seed (the same stream for every
model and learning rate of a setting); accuracy is measured on --eval-examples held-out examples
from another seed.

Models, 2 layers each (--layers) at every width in --d-models:
    hgrn1       HGRN2 at expand_ratio 1: K = 1, H = d_model heads of V = 1, HGRN1's elementwise state
    hgrn2-k16   HGRN2 at expand_ratio 16
    hgrn2-kmax  HGRN2 at expand_ratio min(d_model, --max-expand): 128 as in the paper
    attention   softmax attention (RoPE, SDPA, causal; examples/transformer.py), same blocks and MLP
The output head of every model is its embedding matrix (--no-tie-embeddings unties them).

Each (model, width, setting) is trained at every learning rate of --lrs and the best accuracy is
reported. The runs are spread over --jobs processes sharing the device; every run stops at
--steps or when its share of --time-budget is spent, whichever comes first, and its learning
rate follows a cosine over that same progress. On CUDA each run's training step is captured in a
CUDA graph after 3 eager steps and replayed (examples/graphstep.py; --no-graph: eager). Outputs in
--out: results.json (every run), results.md (best accuracy per cell), mqar.png (accuracy against
d_model, one panel per setting), logs/ and parts/ (each worker's log and runs).

Note: the Triton kernels need K and V in {16, ..., 256}; hgrn1 (K = V = 1) runs on the library's
chunked PyTorch path, so its steps are slower and, within the time budget, it may do fewer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, however we're launched
import graphstep  # noqa: E402
import report  # noqa: E402
from train import HelpFormatter, names_arg, param_groups  # noqa: E402
from transformer import TransformerConfig, TransformerForCausalLM  # noqa: E402

from hgrn2mini import HGRN2Config, HGRN2ForCausalLM  # noqa: E402

MODELS = ("hgrn1", "hgrn2-k16", "hgrn2-kmax", "attention")
LABELS = {"hgrn1": "HGRN1 (HGRN2, K=1)", "hgrn2-k16": "HGRN2, K=16", "hgrn2-kmax": "HGRN2, K=max",
          "attention": "Attention"}
POWER_A = 0.01  # zoology's power law for the query gaps: P(gap = s) ~ (s + 1) ** (POWER_A - 1)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(v > 0 and math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _settings(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        try:
            seq_len, pairs = (int(x) for x in item.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected SEQ_LEN:PAIRS[,...], e.g. 64:4,128:8, got {text!r}") from None
        if pairs < 1 or seq_len < 4 * pairs:
            raise argparse.ArgumentTypeError(
                f"{item}: need pairs >= 1 and seq_len >= 4 * pairs (the pairs, then a query slot "
                f"every other position for each key), got seq_len {seq_len}, pairs {pairs}")
        out.append((seq_len, pairs))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="out/mqar", help="output folder")
    g = p.add_argument_group("the sweep")
    g.add_argument("--models", type=names_arg(MODELS), default=list(MODELS), metavar="M[,M...]",
                   help=f"models, from {','.join(MODELS)} (default: all)")
    g.add_argument("--d-models", type=_int_list, default=[64, 128, 256], metavar="D[,D...]",
                   help="model widths (default: 64,128,256)")
    g.add_argument("--settings", type=_settings, default=[(64, 4), (128, 8), (256, 16), (512, 64)],
                   metavar="T:N[,T:N...]",
                   help="(sequence length, key-value pairs) (default: 64:4,128:8,256:16,512:64)")
    g.add_argument("--lrs", type=_float_list, default=[1e-3, 3e-3, 1e-2], metavar="LR[,LR...]",
                   help="peak learning rates swept per model (default: 1e-3,3e-3,1e-2)")
    g.add_argument("--max-expand", type=int, default=128, help="hgrn2-kmax's expand ratio is min(d_model, this)")
    g = p.add_argument_group("task and training")
    g.add_argument("--vocab-size", type=int, default=8192, help="keys from [1, V/2), values from [V/2, V)")
    g.add_argument("--layers", type=int, default=2, help="blocks per model")
    g.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=True,
                   help="output head = embedding matrix: an answer is a token seen earlier in the example, "
                        "so tied, recall is a copy of its embedding (several times faster to learn in short "
                        "runs; every model the same)")
    # Many small steps share the device at once; a step's kernels are mostly too small to fill
    # it, so a larger batch costs little more device time and gives each step more examples.
    g.add_argument("--batch-tokens", type=int, default=32768,
                   help="tokens per step: batch_tokens // seq_len examples (512 at length 64, 64 at 512)")
    # Captured in a CUDA graph, steps are cheap: the time budget ends most runs; this cap the fastest.
    g.add_argument("--steps", type=int, default=10000, help="most optimizer steps per run")
    g.add_argument("--warmup", type=float, default=0.05, help="share of each run's progress spent warming up")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW, on Linear weight matrices")
    g.add_argument("--eval-examples", type=int, default=3000, help="held-out examples per setting")
    g.add_argument("--seed", type=int, default=0, help="data and initialization")
    g = p.add_argument_group("resources")
    g.add_argument("--time-budget", type=float, default=400.0,
                   help="seconds of wall time for the whole sweep; each run trains for its share of it")
    g.add_argument("--jobs", type=int, default=None,
                   help="worker processes sharing the device (default: 16 on CUDA, 1 on CPU)")
    g.add_argument("--device", default=None, help="(default: cuda if available, else cpu)")
    g.add_argument("--graph", action=argparse.BooleanOptionalAction, default=None,
                   help="capture each run's training step in a CUDA graph (default: on CUDA; eager elsewhere)")
    # Internal: how the parent process starts a worker.
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("vocab_size", "layers", "batch_tokens", "steps", "eval_examples", "max_expand"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if not args.time_budget > 0:
        parser.error(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    if not 0 <= args.warmup < 1:
        parser.error(f"--warmup must be in [0, 1), got {args.warmup}")
    most_pairs = max(pairs for _, pairs in args.settings)
    if args.vocab_size // 2 - 1 < most_pairs:
        parser.error(f"--vocab-size {args.vocab_size} has {args.vocab_size // 2 - 1} keys, fewer than the "
                     f"{most_pairs} pairs of --settings (keys are unique within an example)")
    longest = max(seq_len for seq_len, _ in args.settings)
    if args.batch_tokens < longest:
        parser.error(f"--batch-tokens must be >= the longest sequence of --settings ({longest}), "
                     f"got {args.batch_tokens}")
    for d in args.d_models:
        for model in args.models:
            K = expand_ratio(model, d, args.max_expand)
            if K is not None and d % K:
                parser.error(f"--d-models: {d} is not divisible by {model}'s expand ratio {K}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.jobs is None:
        args.jobs = 16 if args.device.startswith("cuda") else 1
    if args.graph and not args.device.startswith("cuda"):
        parser.error(f"--graph needs a CUDA --device, got {args.device}")
    args.graph = args.device.startswith("cuda") if args.graph is None else args.graph
    return args


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


class Batch(NamedTuple):
    inputs: torch.Tensor  # [B, T] token ids
    query_pos: torch.Tensor  # [B, N] where key i is asked again
    answers: torch.Tensor  # [B, N] its value: the target at query_pos


def _sample_without_replacement(logp: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct indices per row, drawn one after another with probabilities softmax(logp):
    the top k of logp plus Gumbel noise (Gumbel-top-k), on any device in one pass."""
    u = torch.rand(logp.shape, generator=gen, device=logp.device).clamp_(min=1e-20)
    return (logp - torch.log(-torch.log(u))).topk(k, dim=-1).indices


def mqar_batch(n: int, seq_len: int, pairs: int, vocab_size: int, gen: torch.Generator) -> Batch:
    """n examples of MQAR, from the generator `gen` (on the device they are made on)."""
    device = gen.device
    half = vocab_size // 2
    keys = _sample_without_replacement(torch.zeros(n, half - 1, device=device), pairs, gen) + 1  # [n, N]
    values = _sample_without_replacement(torch.zeros(n, vocab_size - half, device=device), pairs, gen) + half
    space = (seq_len - 2 * pairs) // 2  # query slots: every other position after the pairs
    gap_logp = (POWER_A - 1) * torch.arange(1, space + 1, device=device, dtype=torch.float32).log()
    slots = _sample_without_replacement(gap_logp.expand(n, space), pairs, gen)  # [n, N]
    inputs = torch.zeros(n, seq_len, dtype=torch.long, device=device)
    inputs[:, 0 : 2 * pairs : 2] = keys
    inputs[:, 1 : 2 * pairs : 2] = values
    query_pos = 2 * pairs + 2 * slots
    inputs.scatter_(1, query_pos, keys)
    return Batch(inputs, query_pos, values)


def labels(batch: Batch) -> torch.Tensor:
    """[B, T] targets: the answer at every query position, -100 (no loss) everywhere else."""
    return torch.full_like(batch.inputs, -100).scatter_(1, batch.query_pos, batch.answers)


def answer_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits at the query positions only, [B, N, vocab]: the head never sees the other positions.
    Static shapes, so a CUDA graph captures it: N queries in every example of a setting."""
    hidden, _ = model.model(batch.inputs)  # [B, T, D]
    at = batch.query_pos[..., None].expand(-1, -1, hidden.shape[-1])
    return model.lm_head(hidden.gather(1, at))


def mqar_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), batch.answers.flatten())


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def expand_ratio(model: str, d_model: int, max_expand: int) -> int | None:
    """HGRN2's K for a model name at a width (None: not an HGRN2)."""
    return {"hgrn1": 1, "hgrn2-k16": 16, "hgrn2-kmax": min(d_model, max_expand)}.get(model)


def build_model(model: str, d_model: int, args) -> nn.Module:
    K = expand_ratio(model, d_model, args.max_expand)
    if K is None:
        heads = d_model // min(64, d_model)  # head dim 64, as in zoology's attention baselines
        return TransformerForCausalLM(TransformerConfig(args.vocab_size, d_model, args.layers, heads,
                                                        tie_word_embeddings=args.tie_embeddings))
    return HGRN2ForCausalLM(HGRN2Config(vocab_size=args.vocab_size, hidden_size=d_model, num_hidden_layers=args.layers,
                                        expand_ratio=K, tie_word_embeddings=args.tie_embeddings))


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    model: str
    d_model: int
    seq_len: int
    pairs: int
    lr: float


def data_seed(seed: int, seq_len: int, pairs: int, held_out: bool) -> int:
    """One training stream per setting (shared by every model and lr), one held-out set."""
    return (seed * 1_000_003 + seq_len * 1009 + pairs) * 2 + int(held_out)


@torch.no_grad()
def accuracy(model: nn.Module, test: list[Batch], autocast) -> float:
    model.eval()
    correct, total = 0, 0
    for batch in test:
        with autocast:
            pred = answer_logits(model, batch).argmax(-1)
        correct += (pred == batch.answers).sum().item()
        total += batch.answers.numel()
    model.train()
    return correct / total


def batch_size(args, seq_len: int) -> int:
    return args.batch_tokens // seq_len


def train_run(run: Run, args, test: list[Batch], budget_s: float) -> dict:
    """Trains one model at one lr for --steps or budget_s seconds (the first step, which compiles
    the Triton kernels of a new shape, not counted), then measures held-out accuracy."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = build_model(run.model, run.d_model, args).to(device)
    opt = graphstep.make_optimizer(param_groups(model, args.weight_decay), run.lr, (0.9, 0.98), device)
    train_step = graphstep.TrainStep(model, opt, lambda m, b: mqar_loss(answer_logits(m, b), b),
                                     graph=args.graph, autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    gen = torch.Generator(device).manual_seed(data_seed(args.seed, run.seq_len, run.pairs, held_out=False))
    t_first, progress, step, log = None, 0.0, 0, graphstep.LossLog()
    t_run = time.perf_counter()
    while step < args.steps and progress < 1:
        # Cosine over the run's progress: steps done or time spent, whichever is further along.
        graphstep.set_lr(opt, graphstep.warmup_cosine(run.lr, progress, args.warmup))
        loss = train_step(mqar_batch(batch_size(args, run.seq_len), run.seq_len, run.pairs, args.vocab_size, gen))
        step = train_step.steps
        if step == 1 or step % 100 == 0:
            log.record(step, loss)  # read back at the next record: no per-step sync
        if step == 1:
            t_first = time.perf_counter()
        elapsed = time.perf_counter() - t_first
        progress = max(step / args.steps, elapsed / max(budget_s - (t_first - t_run), 1e-9))
    graphstep.synchronize(device)
    train_s = time.perf_counter() - t_run
    losses = log.result()
    acc = accuracy(model, test, train_step.autocast())
    K = expand_ratio(run.model, run.d_model, args.max_expand)
    return dict(asdict(run), label=LABELS[run.model], expand_ratio=K,
                params=sum(p.numel() for p in model.parameters()), steps=step,
                examples=step * batch_size(args, run.seq_len), stopped_by="steps" if step >= args.steps else "time",
                train_s=round(train_s, 2), steps_per_s=round(step / train_s, 1), captured=train_step.captured,
                capture_error=train_step.capture_error, eval_s=round(time.perf_counter() - t_run - train_s, 2),
                loss_curve=losses, final_loss=losses[-1][1] if losses else None, accuracy=acc)


# ---------------------------------------------------------------------------------------------
# The sweep: workers, each a slice of the grid
# ---------------------------------------------------------------------------------------------


def grid(args) -> list[Run]:
    """Every run, the most expensive first (long sequences, wide models), so that dealing them
    round-robin to the workers gives each a similar mix."""
    runs = [Run(m, d, T, N, lr) for (T, N) in args.settings for d in args.d_models for m in args.models
            for lr in args.lrs]
    return sorted(runs, key=lambda r: (-r.seq_len, -r.d_model, MODELS.index(r.model), r.lr))


def test_set(args, seq_len: int, pairs: int) -> list[Batch]:
    gen = torch.Generator(torch.device(args.device)).manual_seed(data_seed(args.seed, seq_len, pairs, held_out=True))
    n = batch_size(args, seq_len)
    sizes = [min(n, args.eval_examples - i) for i in range(0, args.eval_examples, n)]
    return [mqar_batch(n, seq_len, pairs, args.vocab_size, gen) for n in sizes]


def work(args, index: int, jobs: int, t0: float, out_path: Path | None) -> list[dict]:
    """Runs slice `index` of the grid; each run gets an equal share of the time left."""
    torch.set_num_threads(1 if jobs > 1 else torch.get_num_threads())
    mine = grid(args)[index::jobs]
    deadline = t0 + args.time_budget * 0.95  # the rest: the last evaluation and the report
    tests, results = {}, []
    for i, run in enumerate(mine):
        setting = (run.seq_len, run.pairs)
        if setting not in tests:
            tests[setting] = test_set(args, *setting)
        share = max(1.0, (deadline - time.time()) / (len(mine) - i))
        result = train_run(run, args, tests[setting], share * 0.9)  # 10% of the share: evaluation
        results.append(result)
        print(f"[worker {index}] {run.model} d={run.d_model} T={run.seq_len} N={run.pairs} lr={run.lr:g}: "
              f"accuracy {result['accuracy']:.3f} after {result['steps']} steps ({result['train_s']:.0f} s)",
              file=sys.stderr, flush=True)
        if out_path is not None:
            with open(out_path, "a") as f:
                f.write(json.dumps(result) + "\n")
    return results


def launch(args, argv: list[str], t0: float, out: Path) -> list[dict]:
    """--jobs worker processes, each running `work` on its slice; their runs collected."""
    (out / "parts").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for i in range(args.jobs):
        part = out / "parts" / f"worker-{i:02d}.jsonl"
        part.unlink(missing_ok=True)
        log = open(out / "logs" / f"worker-{i:02d}.log", "w")
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", str(i), "--t0", repr(t0)]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, part))
    reported = 0
    while any(proc.poll() is None for proc, _, _ in procs):  # progress: runs finished so far
        time.sleep(5)
        finished = sum(len(part.read_text().splitlines()) for _, _, part in procs if part.is_file())
        if finished != reported:
            reported = finished
            print(f"{finished}/{len(grid(args))} runs done, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    results = []
    for i, (proc, log, part) in enumerate(procs):
        proc.wait()
        log.close()
        if proc.returncode != 0:
            tail = (out / "logs" / f"worker-{i:02d}.log").read_text()[-2000:]
            print(f"worker {i} failed (exit {proc.returncode}); the end of its log:\n{tail}", file=sys.stderr)
        if part.is_file():
            results += [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.out)
    if args.worker is not None:  # a worker: its slice, its own file of results
        work(args, args.worker, args.jobs, args.t0, out / "parts" / f"worker-{args.worker:02d}.jsonl")
        return 0
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    n_runs = len(grid(args))
    print(f"MQAR: {n_runs} runs ({len(args.models)} models x {len(args.d_models)} widths x "
          f"{len(args.settings)} settings x {len(args.lrs)} lrs) in {args.jobs} process(es) on {args.device}, "
          f"{args.time_budget:.0f} s budget", file=sys.stderr, flush=True)
    if args.jobs == 1:
        results = work(args, 0, 1, t0, None)
    else:
        results = launch(args, argv, t0, out)
    wall = time.time() - t0
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    meta = dict(command="python examples/mqar.py " + " ".join(argv), device=device_name,
                date=time.strftime("%Y-%m-%d", time.gmtime()), wall_s=round(wall, 1), runs_expected=n_runs,
                runs_done=len(results), args={k: v for k, v in vars(args).items() if k not in ("worker", "t0")})
    best = report.best_by(results, ("model", "d_model", "seq_len", "pairs"), "accuracy")
    (out / "results.json").write_text(json.dumps(dict(meta=meta, best=best, runs=results), indent=1))
    table = mqar_table(best, args)
    (out / "results.md").write_text(f"MQAR accuracy ({meta['date']}, {device_name}, {wall / 60:.1f} min; "
                                    f"`{meta['command']}`)\n\n{table}\n")
    report.plot_mqar(best, args.settings, LABELS, out / "mqar.png",
                     title=f"MQAR, {args.layers} layers, best of lr {','.join(f'{x:g}' for x in args.lrs)}")
    print("\n" + table, flush=True)
    print(f"\n{len(results)}/{n_runs} runs in {wall / 60:.1f} min; results in {out}/results.md, results.json, "
          f"mqar.png", flush=True)
    return 0 if len(results) == n_runs else 1


def mqar_table(best: list[dict], args) -> str:
    """Best accuracy (and its lr, steps) per model and width, one column per setting."""
    cell = {(r["model"], r["d_model"], r["seq_len"], r["pairs"]): r for r in best}
    header = ["model", "d_model", "K"] + [f"T={T}, N={N}" for T, N in args.settings]
    rows = []
    for model in args.models:
        for d in args.d_models:
            K = expand_ratio(model, d, args.max_expand)
            row = [LABELS[model], str(d), "-" if K is None else str(K)]
            for T, N in args.settings:
                r = cell.get((model, d, T, N))
                row.append("missing" if r is None else
                           f"{r['accuracy']:.3f} (lr {r['lr']:g}, {r['steps']} steps)")
            rows.append(row)
    return report.markdown_table(header, rows)


if __name__ == "__main__":
    sys.exit(main())

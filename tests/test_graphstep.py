"""examples/graphstep.py: the training step both examples share, eager on the CPU and captured in a
CUDA graph on the GPU.

CPU: the schedule and the lr tensor against the scripts' old float schedule, the eager step against
the scripts' old training loops (bit for bit), the loss log, the value checks that skip themselves
during a capture, the --graph option. GPU (marker gpu): for every model of mqar.py and seqcls.py,
captured steps against eager steps (fp32: rtol 1e-5; bf16 autocast: loose, see BF16), replays
without a host sync, the fallback when a capture fails, and the scripts end to end."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import graphstep  # noqa: E402
import image  # noqa: E402
import mqar  # noqa: E402
import seqcls  # noqa: E402

from hgrn2mini.checks import check_attention_mask, check_ids  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Tiny cases of both scripts: a model factory, its loss, batches
# ----------------------------------------------------------------------------------------------


def mqar_case(kind: str, device: str, steps: int, d_model: int = 32, batch: int = 6, seq_len: int = 24, pairs: int = 3,
              vocab: int = 64):
    args = mqar.parse_args(["--d-models", str(d_model), "--vocab-size", str(vocab), "--settings", f"{seq_len}:{pairs}",
                            "--device", device])
    gen = torch.Generator(device).manual_seed(1)
    batches = [mqar.mqar_batch(batch, seq_len, pairs, vocab, gen) for _ in range(steps)]
    groups = lambda model: mqar.param_groups(model, 0.1)  # noqa: E731
    loss = lambda m, b: mqar.mqar_loss(mqar.answer_logits(m, b), b)  # noqa: E731
    return (lambda: mqar.build_model(kind, d_model, args)), loss, groups, batches


def seqcls_case(kind: str, device: str, steps: int, width: int | None = None):
    """Sequences of 48 tokens or fewer (padded: a mask), 10 classes; `width` None: eager batches
    cut at their longest sequence, else static ones of that width."""
    args = SimpleNamespace(width=32, layers=2, expand_ratio=16)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 17, (64, 48))
    lengths = rng.integers(20, 49, 64)
    ids[np.arange(48)[None, :] >= lengths[:, None]] = 0
    labels = rng.integers(0, 10, 64)
    batches = [seqcls._batch(ids, lengths, labels, rng.integers(0, 64, 8), device, width, width is not None)
               for _ in range(steps)]
    groups = lambda model: [{"params": list(model.parameters()), "weight_decay": 0.05}]  # noqa: E731
    return (lambda: seqcls.build_model(kind, 17, 10, 48, args)), seqcls.classifier_loss, groups, batches


def lrs(n: int, peak: float = 3e-3) -> list[float]:
    return [graphstep.warmup_cosine(peak, i / n, 0.25) for i in range(n)]


def train(case, device: str, graph: bool, autocast_dtype=None, loss_fn=None, warmup: int = 3):
    """The case's model trained on its batches by a TrainStep: (losses, parameters, the step)."""
    factory, case_loss, groups, batches = case
    torch.manual_seed(0)
    model = factory().to(device)
    opt = graphstep.make_optimizer(groups(model), 1e-3, (0.9, 0.98), torch.device(device))
    step = graphstep.TrainStep(model, opt, loss_fn or case_loss, graph=graph, autocast_dtype=autocast_dtype,
                               warmup=warmup)
    losses = []
    for lr, batch in zip(lrs(len(batches)), batches):
        graphstep.set_lr(opt, lr)
        losses.append(step(batch).clone())
    return torch.stack(losses).cpu(), [p.detach().cpu().clone() for p in model.parameters()], step


# ----------------------------------------------------------------------------------------------
# CPU: the pieces, and the eager step against the scripts' loops as they were
# ----------------------------------------------------------------------------------------------


def test_warmup_cosine_is_both_scripts_old_schedule():
    for progress in np.linspace(0, 0.999, 41):
        warm = min(1.0, progress / 0.05)
        old_mqar = 3e-3 * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        old_seqcls = 3e-3 * min(1.0, progress / 0.05) * (0.55 + 0.45 * math.cos(math.pi * min(progress, 1.0)))
        assert graphstep.warmup_cosine(3e-3, progress, 0.05) == old_mqar
        assert graphstep.warmup_cosine(3e-3, progress, 0.05) == pytest.approx(old_seqcls, rel=1e-12, abs=1e-18)
    assert graphstep.warmup_cosine(1.0, 0.5, 0.0) == pytest.approx(0.55)


def test_lr_tensor_follows_the_float_schedule():
    """An AdamW whose lr is a tensor written in place by set_lr takes the same steps as one whose
    float lr is set, over a schedule."""
    torch.manual_seed(0)
    a = torch.nn.Linear(5, 3)
    b = torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.1)
    opt_b = torch.optim.AdamW(b.parameters(), lr=torch.tensor(1e-3), betas=(0.9, 0.98), weight_decay=0.1,
                              foreach=False)
    x = torch.randn(7, 5)
    for lr in lrs(6, peak=1e-2):
        for model, opt in ((a, opt_a), (b, opt_b)):
            graphstep.set_lr(opt, lr)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert isinstance(opt_b.param_groups[0]["lr"], torch.Tensor) and opt_b.param_groups[0]["lr"].item() == \
            pytest.approx(lr, rel=1e-6)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)


def test_cuda_optimizer_is_fused_capturable_with_a_tensor_lr_and_cpu_one_as_before():
    model = torch.nn.Linear(4, 4)
    opt = graphstep.make_optimizer(mqar.param_groups(model, 0.1), 2e-3, (0.9, 0.98), torch.device("cpu"))
    assert opt.param_groups[0]["lr"] == 2e-3 and not opt.param_groups[0]["capturable"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # the script's groups kept


def old_mqar_loop(model, opt, batches, schedule):
    """examples/mqar.py's training loop before graphstep (CPU: no autocast)."""
    losses = []
    for lr, batch in zip(schedule, batches):
        for group in opt.param_groups:
            group["lr"] = lr
        loss = mqar.mqar_loss(mqar.answer_logits(model, batch), batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses


def old_seqcls_loop(model, opt, batches, schedule):
    """examples/seqcls.py's training loop before graphstep (CPU: no autocast)."""
    losses = []
    for lr, (x, y, mask) in zip(schedule, batches):
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(x, labels=y, attention_mask=mask).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("script, kind", [("mqar", k) for k in mqar.MODELS] + [("seqcls", k) for k in seqcls.MODELS])
def test_eager_step_is_the_old_loop_on_cpu(script, kind):
    steps = 4
    case = mqar_case(kind, "cpu", steps) if script == "mqar" else seqcls_case(kind, "cpu", steps)
    factory, _, groups, batches = case
    torch.manual_seed(0)
    model = factory()
    if script == "mqar":
        opt = torch.optim.AdamW(mqar.param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.98), fused=False)
        old = old_mqar_loop(model, opt, batches, lrs(steps))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, betas=(0.9, 0.98))
        old = old_seqcls_loop(model, opt, batches, lrs(steps))
    losses, params, step = train(case, "cpu", graph=False)
    assert step.steps == steps and not step.captured and step.capture_error is None
    assert torch.equal(losses, torch.stack(old))
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))


def test_loss_log_copies_and_reads_back_later():
    log = graphstep.LossLog()
    loss = torch.tensor(2.5)
    log.record(1, loss)
    loss.fill_(7.0)  # a captured step's static loss is overwritten by the next replay
    log.record(100, loss)
    assert log.result() == [(1, 2.5), (100, 7.0)]


def test_value_checks_skip_only_while_a_capture_is_under_way(monkeypatch):
    ids, mask = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2, 1]])
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        check_attention_mask(mask, ids)
    with pytest.raises(ValueError, match="input_ids must be in"):
        check_ids(ids, "input_ids", 3, "vocab_size")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    check_attention_mask(mask, ids)  # a value check would end the capture: skipped
    check_ids(ids, "input_ids", 3, "vocab_size")
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):  # shapes still checked
        check_attention_mask(mask[:, :2], ids)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        check_attention_mask(mask, ids)


def test_train_step_bad_arguments():
    model = torch.nn.Linear(2, 2)
    opt = graphstep.make_optimizer(model.parameters(), 1e-3, (0.9, 0.98), torch.device("cpu"))
    with pytest.raises(ValueError, match="graph=True needs the model on a CUDA device, got cpu"):
        graphstep.TrainStep(model, opt, lambda m, b: m(b[0]).sum(), graph=True)
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        graphstep.TrainStep(model, opt, lambda m, b: m(b[0]).sum(), graph=False, warmup=0)


def test_graph_option_on_cpu(tmp_path, capsys):
    assert mqar.parse_args(["--device", "cpu"]).graph is False
    with pytest.raises(SystemExit):
        mqar.parse_args(["--device", "cpu", "--graph"])
    assert "--graph needs a CUDA --device, got cpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        image.main(["--out", str(tmp_path), "--device", "cpu", "--graph"])
    assert "--graph needs a CUDA --device, got cpu" in capsys.readouterr().err


def test_results_record_capture_and_steps_per_second(tmp_path):
    assert mqar.main(["--out", str(tmp_path), "--d-models", "32", "--settings", "16:2", "--vocab-size", "64",
                      "--models", "hgrn2-k16", "--lrs", "3e-3", "--steps", "3", "--batch-tokens", "96",
                      "--eval-examples", "10", "--device", "cpu", "--no-graph"]) == 0
    run, = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert run["captured"] is False and run["capture_error"] is None and run["steps_per_s"] > 0


# ----------------------------------------------------------------------------------------------
# GPU: captured against eager, no host sync, the fallback, the scripts
# ----------------------------------------------------------------------------------------------

CASES = [("mqar", k) for k in mqar.MODELS] + [("seqcls", k) for k in seqcls.MODELS]
# bf16 autocast: both runs launch the same kernels, so they agree far closer than this; the
# tolerance is loose because some bf16 backward kernels (SDPA's) may accumulate in a different
# order from run to run. A replay that did nothing would still be caught: a step moves a
# parameter by about the lr (3e-3 at the schedule's peak), over the 5e-4 allowed here.
BF16 = dict(loss=dict(rtol=2e-2, atol=2e-2), params=dict(rtol=0, atol=5e-4))
FP32 = dict(loss=dict(rtol=1e-5, atol=1e-6), params=dict(rtol=1e-5, atol=1e-6))


def gpu_case(script: str, kind: str, steps: int):
    """At real sizes where it matters: mqar's batch of 128 x 64 = 8,192 tokens takes the
    embedding backward's sort path (over 4,096 indices), as the sweep's 32,768-token steps do."""
    if script == "mqar":
        return mqar_case(kind, "cuda", steps, d_model=64, batch=128, seq_len=64, pairs=4, vocab=512)
    return seqcls_case(kind, "cuda", steps, width=48)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("script, kind", CASES)
def test_captured_steps_match_eager_steps(script, kind, dtype):
    case = gpu_case(script, kind, 9)  # 3 warm-up steps, the capture (and its replay), 5 replays
    eager_losses, eager_params, eager = train(case, "cuda", graph=False, autocast_dtype=dtype)
    losses, params, step = train(case, "cuda", graph=True, autocast_dtype=dtype)
    assert step.captured and step.capture_error is None and step.steps == eager.steps == 9
    tol = FP32 if dtype is None else BF16
    torch.testing.assert_close(losses, eager_losses, **tol["loss"])
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, **tol["params"])


@pytest.mark.gpu
@pytest.mark.parametrize("script, kind", [("mqar", "hgrn2-k16"), ("mqar", "hgrn1"), ("seqcls", "hgrn2"),
                                          ("seqcls", "attention")])
def test_replays_do_not_sync_with_the_host(script, kind):
    case = gpu_case(script, kind, 6)
    _, _, step = train(case, "cuda", graph=True, autocast_dtype=torch.bfloat16)
    assert step.captured
    batches = case[3]
    before = [p.detach().clone() for p in step.model.parameters()]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[:3]:
            graphstep.set_lr(step.opt, 1e-3)
            loss = step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
    assert any(not torch.equal(p, q) for p, q in zip(step.model.parameters(), before))  # the replays trained


@pytest.mark.gpu
def test_a_batch_of_another_shape_is_refused():
    case = gpu_case("mqar", "hgrn2-k16", 5)
    _, _, step = train(case, "cuda", graph=True)
    other = mqar.mqar_batch(64, 64, 4, 512, torch.Generator("cuda").manual_seed(0))
    with pytest.raises(ValueError, match=r"batch\[0\] must match the first batch"):
        step(other)
    seqcls_step = train(gpu_case("seqcls", "hgrn2", 5), "cuda", graph=True)[2]
    x, y, mask = gpu_case("seqcls", "hgrn2", 1)[3][0]
    with pytest.raises(ValueError, match=r"batch\[2\] must be None where the first batch's is"):
        seqcls_step((x, y, None))


@pytest.mark.gpu
def test_a_failed_capture_falls_back_to_eager_steps_with_a_warning():
    case = gpu_case("mqar", "hgrn2-k16", 6)

    def syncing_loss(model, batch):  # reads the loss on the host: no capture can hold that
        loss = case[1](model, batch)
        if not math.isfinite(loss.item()):
            raise AssertionError("non-finite loss")
        return loss

    eager_losses, eager_params, _ = train(case, "cuda", graph=False, loss_fn=syncing_loss)
    with pytest.warns(graphstep.GraphCaptureWarning, match="CUDA graph capture of the training step failed"):
        losses, params, step = train(case, "cuda", graph=True, loss_fn=syncing_loss)
    assert not step.captured and step.capture_error and step.steps == 6
    torch.testing.assert_close(losses, eager_losses, **FP32["loss"])
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, **FP32["params"])
    # Only one warning, however many steps follow.
    with warnings.catch_warnings():
        warnings.simplefilter("error", graphstep.GraphCaptureWarning)
        graphstep.set_lr(step.opt, 1e-3)
        step(case[3][0])


@pytest.mark.gpu
def test_scripts_capture_their_steps(tmp_path):
    assert mqar.main(["--out", str(tmp_path / "mqar"), "--d-models", "64", "--settings", "64:4", "--lrs", "3e-3",
                      "--steps", "20", "--eval-examples", "200", "--jobs", "1", "--time-budget", "120"]) == 0
    runs = json.loads((tmp_path / "mqar" / "results.json").read_text())["runs"]
    assert len(runs) == 4 and all(r["captured"] and r["steps"] == 20 and r["steps_per_s"] > 0 for r in runs), runs
    image.main(["--out", str(tmp_path / "image"), "--jobs", "1", "--max-steps", "12", "--time-budget", "120",
                "--width", "32", "--layers", "1", "--expand-ratio", "16", "--batch-size", "8"])
    runs = json.loads((tmp_path / "image" / "results.json").read_text())["runs"]
    assert len(runs) == 3 and all(r["captured"] and r["steps"] == 12 for r in runs), runs


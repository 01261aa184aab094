"""A training step captured in one CUDA graph and replayed, shared by mqar.py and seqcls.py.

The examples' models are small: an eager step is tens of milliseconds of Python and kernel
launches for a few milliseconds of GPU work. `TrainStep` follows PyTorch's "whole network
capture" recipe (torch.cuda.graphs docs): the batch is copied into static input buffers; the
first `warmup` steps run eagerly on a side stream (real steps on real batches: the optimizer
state is created, the Triton kernels compile, cuBLAS sets up); then forward + loss + backward +
gradient clipping + AdamW's step are captured in one `torch.cuda.CUDAGraph`, and every later step
is one copy of the batch into the buffers and one replay.

What the captured region needs, and where it is arranged:
- AdamW with `capturable=True` (and fused), its learning rate a 1-element device tensor that
  `set_lr` overwrites in place before each step, so a replay reads the schedule's current value
  (`make_optimizer`).
- No host synchronisation: `clip_grad_norm_` runs with error_if_nonfinite=False (no check of the
  norm on the host); the library's value checks of input ids and masks skip themselves while a
  capture is under way (`hgrn2mini.checks.is_tracing`); the loss is read back only every few
  steps, from a device copy (`LossLog`).
- bf16 autocast with `cache_enabled=False`: a cast cached during the capture would not be
  redone at replay.
- Gradients are None when the capture starts, so the captured backward allocates them in the
  graph's private pool and every replay writes them afresh (no zeroing needed).
- Static shapes: the batch's tensors keep the shapes, dtypes and places (None entries
  included) of the first batch (a different one is a clear error, not a silent wrong replay).

A capture that fails (a model path that syncs with the host or is not capturable) falls back to
eager steps with one `GraphCaptureWarning` naming the reason; `captured` says which ran. On a CPU
device every step is eager, exactly the examples' loop as it was.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn


class GraphCaptureWarning(UserWarning):
    """The training step could not be captured in a CUDA graph; training goes on eagerly."""


def make_optimizer(param_groups: Iterable[dict], lr: float, betas: tuple[float, float], device: torch.device,
                   weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over param_groups (each group may set its own weight_decay). On CUDA: fused and
    capturable, its lr a float32 tensor on the device, shared by every group (what a captured step
    reads at each replay; `set_lr` writes it). Elsewhere: a float lr and torch's default
    implementation, as the examples had it."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, weight_decay=weight_decay)
    groups = list(param_groups)
    index = device.index if device.index is not None else torch.cuda.current_device()
    # On the parameters' own device (cuda:N, not "cuda"): fused AdamW then reads it where it lies.
    lr_tensor = torch.tensor(float(lr), dtype=torch.float32, device=torch.device("cuda", index))
    return torch.optim.AdamW(groups, lr=lr_tensor, betas=betas, weight_decay=weight_decay, fused=True,
                             capturable=True)


def warmup_cosine(peak: float, progress: float, warmup: float) -> float:
    """Both examples' schedule: the lr at progress in [0, 1] of a run (steps or time), a linear
    warm-up over its first `warmup`, then a cosine from the peak to 10% of it at progress 1."""
    warm = min(1.0, progress / warmup) if warmup > 0 else 1.0
    return peak * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr to `lr`: in place where it is a tensor (a device kernel, no host sync),
    else as a float."""
    done = set()
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            if id(group["lr"]) not in done:
                group["lr"].fill_(lr)
                done.add(id(group["lr"]))
        else:
            group["lr"] = lr


def root_cause(error: BaseException) -> BaseException:
    """The first error of a chain: a failed capture raises again as the capture ends ('operation
    failed due to a previous error during capture'); the one before says what failed."""
    while error.__context__ is not None and error.__context__ is not error:
        error = error.__context__
    return error


class TrainStep:
    """One optimizer step: `loss_fn(model, batch)` (a scalar tensor), backward, gradient norm
    clipped to max_norm, opt.step(); in a CUDA graph after `warmup` eager steps when graph=True.

    Call it with the batch: a tuple or NamedTuple of tensors on the model's device (or None);
    loss_fn gets one of the same type. It returns the loss as a device tensor; once captured,
    the graph's static loss, overwritten by the next step: copy it (`LossLog`) rather than keep
    it. `steps` counts every step taken, warm-up steps included; `captured` says whether the
    steps now replay a graph; `capture_error` why not, after a fallback."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable[..., torch.Tensor], *,
                 graph: bool, autocast_dtype: torch.dtype | None = None, max_norm: float = 1.0, warmup: int = 3):
        self.model, self.opt, self.loss_fn = model, opt, loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        if graph and self.device.type != "cuda":
            raise ValueError(f"graph=True needs the model on a CUDA device, got {self.device}")
        if graph and not all(g.get("capturable") for g in opt.param_groups):
            raise ValueError("graph=True needs an optimizer with capturable=True (make_optimizer on CUDA)")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 eager step before the capture, got {warmup}")
        self.graph, self.warmup, self.max_norm = graph, warmup, max_norm
        self.autocast_dtype = autocast_dtype
        self.steps = 0
        self.captured = False
        self.capture_error: str | None = None
        self._static: tuple | None = None
        self._static_loss: torch.Tensor | None = None
        self._cuda_graph: torch.cuda.CUDAGraph | None = None
        self._side = torch.cuda.Stream(self.device) if graph else None

    def autocast(self):
        """The step's autocast context (a null context without autocast_dtype)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # cache_enabled=False: inside a capture a cached cast would be recorded once and never redone.
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def _forward_backward_step(self, batch) -> torch.Tensor:
        with self.autocast():
            loss = self.loss_fn(self.model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)  # error_if_nonfinite=False: no sync
        self.opt.step()
        return loss.detach()

    def _eager(self, batch) -> torch.Tensor:
        with warnings.catch_warnings():
            # torch warns once that a capturable optimizer steps uncaptured: expected in the warm-up
            # before a capture, and with graph=False on CUDA, which keeps the same optimizer (and
            # numbers) as the captured path.
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            loss = self._forward_backward_step(batch)
        self.opt.zero_grad(set_to_none=True)
        return loss

    def __call__(self, batch: tuple) -> torch.Tensor:
        self.steps += 1
        if not self.graph:
            return self._eager(batch)
        self._fill(batch)
        if self._cuda_graph is not None:
            self._cuda_graph.replay()
            return self._static_loss
        if self.steps <= self.warmup:
            # The recipe's warm-up: on a side stream, so that the capture's stream starts clean.
            self._side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side):
                loss = self._eager(self._static)
            torch.cuda.current_stream(self.device).wait_stream(self._side)
            return loss
        return self._capture()

    def _fill(self, batch: tuple) -> None:
        """The batch into the static buffers, made from the first batch (of its type)."""
        if self._static is None:
            static = [None if x is None else x.clone() for x in batch]
            self._static = type(batch)(*static) if hasattr(batch, "_fields") else tuple(static)
            return
        if len(batch) != len(self._static):
            raise ValueError(f"batch must have the first batch's {len(self._static)} entries, got {len(batch)}")
        for i, (buf, x) in enumerate(zip(self._static, batch)):
            if buf is None or x is None:
                if buf is not x:
                    raise ValueError(f"batch[{i}] must be None where the first batch's is, and only there "
                                     f"(a captured step has a static structure), got {describe(x)}")
                continue
            if x.shape != buf.shape or x.dtype != buf.dtype or x.device != buf.device:
                raise ValueError(f"batch[{i}] must match the first batch (a captured step has static shapes): "
                                 f"{describe(buf)}, got {describe(x)}")
            buf.copy_(x)

    def _capture(self) -> torch.Tensor:
        """Captures the step on the static buffers and replays it (a capture runs nothing), or
        falls back to eager steps with a warning."""
        self.opt.zero_grad(set_to_none=True)  # the captured backward allocates them in the graph's pool
        cuda_graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.graph(cuda_graph):
                static_loss = self._forward_backward_step(self._static)
        except Exception as error:  # noqa: BLE001 - any failure: fall back, saying why
            # torch.cuda.graph's exit raises before restoring the stream when the capture fails.
            torch.cuda.set_stream(stream)
            cause = root_cause(error)
            self.graph, self.capture_error = False, f"{type(cause).__name__}: {str(cause).strip().splitlines()[0]}"
            warnings.warn(f"CUDA graph capture of the training step failed ({self.capture_error}); "
                          f"training eagerly instead", GraphCaptureWarning, stacklevel=3)
            del cuda_graph
            self.opt.zero_grad(set_to_none=True)  # the failed capture's gradients were never computed
            return self._eager(self._static)
        self._cuda_graph, self._static_loss, self.captured = cuda_graph, static_loss, True
        cuda_graph.replay()
        return static_loss


def describe(x) -> str:
    return "None" if x is None else f"{x.dtype} {list(x.shape)} on {x.device}"


class LossLog:
    """(key, loss) pairs, where key is the step or the time the caller records, without a host
    sync per step: each recorded loss is copied on the device (the static loss of a captured step
    is overwritten by the next replay), and each copy is read back when the next is recorded, by
    which time its step has usually finished. So the host never runs more than one recording
    interval ahead of the device, and the timing of a time-budgeted run stays honest."""

    def __init__(self):
        self._pending: list[tuple[object, torch.Tensor]] = []
        self.values: list[tuple[object, float]] = []

    def record(self, key, loss: torch.Tensor) -> None:
        self._read()
        self._pending.append((key, loss.detach().clone()))

    def _read(self) -> None:
        self.values += [(key, loss.item()) for key, loss in self._pending]
        self._pending.clear()

    def result(self) -> list[tuple[object, float]]:
        """Every recorded (key, loss) as floats (reads the last copy: a sync)."""
        self._read()
        return self.values


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (before a time is taken), a no-op on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)

"""How the chunk kernels are launched: through `wrap_triton` under a tracer, through their compiled
launchers on real tensors (`_Launch`; the interpreter runs the raw kernel), and the out and dq/dg
kernels in two launches, both sides of it (`_launch_chunks` on the host, `_redone` / `_redone_at`
in the second launch's programs).
"""

from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl
from hgrn2mini.kernels.gates import _INTERPRETING
from hgrn2mini.kernels.settings import CONFIG, cdiv
from torch.library import wrap_triton

# torch's switch for launches in a triton_op's body: off where the body runs on real tensors (the op
# run eagerly, or hgrn2mini.ops._Direct), on under tracers. Feature-detected, like Triton's knobs.
_wrap_enabled = getattr(torch._library.triton, "is_wrap_triton_enabled", None)
_knobs = getattr(triton, "knobs", None)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def launcher(kernel):
    """kernel as its caller launches it: under a tracer through wrap_triton, so that Inductor sees the
    kernel inside the op; on real tensors through its compiled launcher (`_Launch`, where
    CONFIG["direct_launch"]); under the interpreter (CPU tests) the raw kernel."""
    if _INTERPRETING:
        return kernel
    if CONFIG["direct_launch"] and _LAUNCH_OK and not _wrap_enabled():
        launch = _LAUNCHES.get(kernel)
        if launch is None:
            launch = _LAUNCHES[kernel] = _Launch(kernel)
        return launch
    return wrap_triton(kernel)


_LAUNCH_OK = None not in (_wrap_enabled, _knobs, _raw_stream)


class _Launch:
    """A Triton kernel launched through the compiled kernel that Triton's own launch returned the
    first time with the same specialization. Triton's launch derives the specialization, its cache
    key, the options, device and stream again on every call, tens of microseconds of host time a
    launch; an eager forward and backward of the op is a dozen launches of kernels that take tens
    to hundreds of microseconds on the GPU. Here one tuple keys a dict.

    The key holds everything a compiled kernel is specialized on: each tensor's dtype and 16-byte
    alignment, each int's value (Triton: whether it is 1, divisible by 16, 32- or 64-bit), every
    other argument's value (constexprs, None, bools, floats), the launch options (num_warps, ...)
    and the current device. Launches with a profiler's hooks set, and calls that leave an argument
    to its default, go through Triton; a Triton whose launcher takes other arguments (a TypeError,
    raised before launching) switches CONFIG["direct_launch"] off with a warning."""

    __slots__ = ("kernel", "names", "name_set", "compiled")

    def __init__(self, kernel):
        self.kernel, self.names, self.compiled = kernel, tuple(kernel.arg_names), {}
        self.name_set = frozenset(self.names)

    def __getitem__(self, grid):
        return functools.partial(self.launch, tuple(grid))

    def launch(self, grid, *args, **kwargs):
        try:
            values = args + tuple([kwargs[n] for n in self.names[len(args):]])
        except KeyError:  # an argument left to its default: Triton's binder fills it in
            return self.kernel[grid](*args, **kwargs)
        options = tuple(sorted((k, kwargs[k]) for k in kwargs.keys() - self.name_set))
        device = torch.cuda.current_device()
        # Tensors go to the launcher as their addresses: given a tensor, Triton's launcher calls its
        # data_ptr() and asks the driver about the address (cuPointerGetAttribute), a driver call
        # per pointer per launch; given an int it takes it as is. A tensor off the GPU never gets
        # here: its key (is_cuda) is one that Triton's own launch refused, so none was kept.
        plain = [x.data_ptr() if isinstance(x, torch.Tensor) else x for x in values]
        key = (device, options, *[(x.dtype, p % 16 == 0, x.is_cuda) if isinstance(x, torch.Tensor) else x
                                  for x, p in zip(values, plain)])
        compiled = self.compiled.get(key)
        if compiled is None or _hooked():
            compiled = self.kernel[grid](*args, **kwargs)
            # Kept once loaded (launched, `function` set), up to a bound for callers sweeping sizes.
            if getattr(compiled, "function", None) is not None and len(self.compiled) < 1024:
                self.compiled[key] = compiled
            return compiled
        grid = grid + (1, 1)
        try:
            compiled.run(grid[0], grid[1], grid[2], _raw_stream(device), compiled.function, compiled.packed_metadata,
                         None, None, None, *plain)
        except TypeError as e:  # a Triton whose launcher takes other arguments (refused before launching)
            CONFIG["direct_launch"] = False
            warnings.warn(f"hgrn2mini: launching through Triton from now on; its compiled launcher refused the "
                          f"direct call ({e})", RuntimeWarning, stacklevel=2)
            return self.kernel[grid[:3]](*args, **kwargs)
        return compiled


_LAUNCHES: dict = {}  # JITFunction -> its _Launch


def _hooked() -> bool:
    """Whether a launch hook is set (profilers): then every launch goes through Triton, which calls it."""
    hook = _knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


def plain_eager(*tensors) -> bool:
    """Whether a call runs on plain tensors outside every tracer: no compiler or exporter, no
    dispatch mode (fake tensors, functionalization). There the kernels can be launched directly
    (autograd.Functions, raw launches); elsewhere the tracer needs the PyTorch or op path."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    if torch.utils._python_dispatch._get_current_dispatch_mode() is not None:
        return False
    return all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


@triton.jit
def _redone(flags, first, stride, n0, NT, REDO: tl.constexpr):
    """The flags of chunks n0 .. n0 + REDO - 1 (0 past NT) of one program column of a first
    launch's grid, as int32: which of them a FLAGGED launch's program redoes."""
    ns = n0 + tl.arange(0, REDO)
    return (tl.load(flags + first + tl.arange(0, REDO) * stride, mask=ns < NT, other=0) != 0).to(tl.int32)


@triton.jit
def _redone_at(fl, r, REDO: tl.constexpr):
    """Whether the r-th of `_redone`'s flags is set (one term survives the sum)."""
    return tl.sum(tl.where(tl.arange(0, REDO) == r, fl, 0), 0) != 0


def _redo_chunks(grid, device: torch.device) -> int:
    """Chunks each program of a FLAGGED launch covers: the first launch's programs over at least
    two per SM, a power of two up to 16. Most chunks are never flagged, and the FLAGGED launch's
    programs, compiled for every path, fit one or two to an SM: one per chunk, they would only load
    a flag and return, yet the GPU still starts them wave after wave. Where every chunk is flagged,
    a program walks its REDO chunks in about the waves the one-per-chunk launch takes."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 1
    redo = 1
    while redo < 16 and grid[0] * grid[1] * grid[2] >= 2 * redo * 2 * sms:
        redo *= 2
    return redo


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _launch_chunks(kernel, grid, *args, JOIN=None, STORE_GCUM=None, **meta):
    """Launches the out or dq/dg kernel over its grid (chunks along its second axis): where K and V
    are at least CONFIG["two_pass_min_dim"], as its whole-chunk variant and then its GENERAL,
    FLAGGED variant, which redoes the programs the first flagged (chunks decaying by more than
    e^120), REDO chunks a program (`_redo_chunks`); else once, GENERAL for every program. JOIN and
    STORE_GCUM (the out kernel's; None for dq/dg) go to the first launch only: the states it joins
    are global for the second, and it stores every chunk's b."""
    first_only = {} if JOIN is None else {"JOIN": JOIN, "STORE_GCUM": STORE_GCUM}
    two_pass = min(meta["K"], meta["V"]) >= CONFIG["two_pass_min_dim"]
    flags = torch.empty(grid[0] * grid[1] * grid[2], device=args[0].device, dtype=torch.int8)
    launcher(kernel)[grid](*args, flags=flags, GENERAL=not two_pass, FLAGGED=False, REDO=1, **first_only, **meta)
    if two_pass:
        redo = _redo_chunks(grid, args[0].device)
        launcher(kernel)[(grid[0], cdiv(grid[1], redo), grid[2])](
            *args, flags=flags, GENERAL=True, FLAGGED=True, REDO=redo, **{k: False for k in first_only}, **meta)

"""How the chunk kernels are launched: through `wrap_triton` inside the ops (the interpreter runs
the raw kernel), and the out and dq/dg kernels in two launches, both sides of it (`_launch_chunks`
on the host, `_redone` / `_redone_at` in the second launch's programs).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from hgrn2mini.kernels.gates import _INTERPRETING
from hgrn2mini.kernels.settings import CONFIG
from torch.library import wrap_triton


def launcher(kernel):
    """kernel as a triton_op launches it: wrap_triton lets Inductor see the kernel inside the op;
    the interpreter (CPU tests) runs the raw kernel."""
    return kernel if _INTERPRETING else wrap_triton(kernel)


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
        launcher(kernel)[(grid[0], triton.cdiv(grid[1], redo), grid[2])](
            *args, flags=flags, GENERAL=True, FLAGGED=True, REDO=redo, **{k: False for k in first_only}, **meta)

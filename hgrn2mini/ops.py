"""The HGRN2 recurrence as `torch.library` ops: `hgrn2mini::chunk_hgrn2` and its backward.

Both are `triton_op`s, so Inductor sees the Triton kernels inside them and `torch.export` keeps
each as one node. Under `torch.compile` the body of a triton_op is traced on every device, so the
body itself picks the implementation: the Triton kernels for supported CUDA shapes, the chunked
PyTorch path (`hgrn2mini.kernels.chunk.*_ref`) otherwise.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from hgrn2mini.kernels import chunk as _chunk

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _check(q, g, v, initial_state) -> None:
    """Clear errors that name the argument, what was expected and what came."""
    for name, x in (("q", q), ("g", g), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, T, H, D] (4 dims), got shape {list(x.shape)}")
    if q.dtype not in _FLOAT:
        raise TypeError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    if v.dtype != q.dtype:
        raise TypeError(f"v must have q's dtype {q.dtype}, got {v.dtype}")
    if g.dtype != torch.float32:
        raise TypeError(f"g (log forget gate) must be float32, got {g.dtype}")
    if g.shape != q.shape:
        raise ValueError(f"g must have q's shape [B, T, H, K] = {list(q.shape)}, got {list(g.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [B, T, H, V] with B, T, H = {list(q.shape[:3])} as q, got {list(v.shape)}"
        )
    if not (q.device == g.device == v.device):
        raise ValueError(f"q, g, v must be on one device, got {q.device}, {g.device}, {v.device}")
    if initial_state is not None:
        B, _, H, K = q.shape
        check_state("initial_state", initial_state, "[B, H, K, V]", (B, H, K, v.shape[-1]), q.device)


def check_state(name: str, state, layout: str, want: tuple, device: torch.device,
                device_of: str = "") -> None:
    """A recurrent state: a float32 tensor of shape `want` on `device`, or a clear error."""
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout} = {list(want)}, got {type(state).__name__}")
    if tuple(state.shape) != tuple(want):
        raise ValueError(f"{name} must be {layout} = {list(want)}, got {list(state.shape)}")
    if state.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {state.dtype}")
    if state.device != device:
        raise ValueError(f"{name} must be on {device_of}{device}, got {state.device}")


@triton_op("hgrn2mini::chunk_hgrn2", mutates_args=())
def _chunk_hgrn2(
    q: torch.Tensor, g: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, final state, kept states). The third output is what the backward may reuse: the Triton
    path's chunk-start states when `kernels.chunk.CONFIG["keep_states"]`, as their raw bits in an
    integer dtype (so autograd gives it no gradient), else an empty tensor."""
    _check(q, g, v, initial_state)
    kept = q.new_empty(0, dtype=_BITS[q.dtype])
    if _chunk.triton_supported(q, v):
        o, hT, states = _chunk.chunk_hgrn2_fwd_with_states(q, g, v, initial_state, scale)
        if _chunk.CONFIG["keep_states"]:
            kept = states.view(_BITS[states.dtype])
    else:
        o, hT = _chunk.chunk_hgrn2_fwd_ref(q, g, v, initial_state, scale)
    return o, hT, kept


@triton_op("hgrn2mini::chunk_hgrn2_bwd", mutates_args=())
def _chunk_hgrn2_bwd(
    q: torch.Tensor,
    g: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    scale: float,
    states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if _chunk.triton_supported(q, v):
        kept = states.view(q.dtype) if states is not None and states.numel() > 0 else None
        return _chunk.chunk_hgrn2_bwd(q, g, v, initial_state, do, dht, scale, kept)
    return _chunk.chunk_hgrn2_bwd_ref(q, g, v, initial_state, do, dht, scale)


def _setup_context(ctx, inputs, output):
    q, g, v, initial_state, scale = inputs
    ctx.save_for_backward(q, g, v, initial_state, output[2])
    ctx.scale = scale
    # Unused outputs get None, not zeros: no [B, H, K, V] or states-sized zeros to make and read.
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dht, _):
    q, g, v, initial_state, states = ctx.saved_tensors
    if do is None:  # only the final state was used
        do = torch.zeros_like(v)
    # do can arrive with stride 0 (the gradient of `.sum()`): the Triton wrapper makes it dense.
    dq, dg, dv, dh0 = torch.ops.hgrn2mini.chunk_hgrn2_bwd(q, g, v, initial_state, do, dht, ctx.scale, states)
    return dq, dg, dv, (dh0 if initial_state is not None else None), None


_chunk_hgrn2.register_autograd(_backward, setup_context=_setup_context)


def chunk_hgrn2(
    q: torch.Tensor,
    g: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HGRN2's gated linear recurrence with the key tied to the forget gate.

    Args:
        q: [B, T, H, K] query (HGRN2's output gate), float32 / bfloat16 / float16.
        g: [B, T, H, K] float32 log forget gate, g <= 0; the key is k = 1 - exp(g), derived inside.
        v: [B, T, H, V] value (HGRN2's input), q's dtype.
        initial_state: optional [B, H, K, V] float32 state to start from.
        scale: multiplies q; defaults to K ** -0.5.
    Returns:
        o: [B, T, H, V] in v's dtype, and the final state [B, H, K, V] float32.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    o, hT, _ = torch.ops.hgrn2mini.chunk_hgrn2(q, g, v, initial_state, float(scale))
    return o, hT

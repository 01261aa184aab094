"""The HGRN2 recurrence as `torch.library` ops: `hgrn2mini::chunk_hgrn2` (q, g, v) and
`hgrn2mini::gated_chunk_hgrn2` (the gates computed from their logits inside), each with its
backward op.

All are `triton_op`s, so Inductor sees the Triton kernels inside them and `torch.export` keeps
each as one node. Under `torch.compile` the body of a triton_op is traced on every device, so the
body itself picks the implementation: the Triton kernels for supported CUDA shapes, the chunked
PyTorch path (`hgrn2mini.kernels.chunk.*_ref`) otherwise.

Why the gated op: autograd through the gates keeps q (bf16) and g (fp32) for the recurrence's
backward, 3x a projection's bytes per layer. Recomputing them with torch.utils.checkpoint makes
Inductor recompute the gates in several kernels of the backward, and torch's compiler does not
honour an autograd.Function's own backward (it keeps q and g anyway). As one op, what its
backward keeps is exactly what `_setup_context` saves: the two logits (bf16), v, lb, the initial
state, the op's chunk states; the backward op recomputes the gates and applies their derivative
(`hgrn2mini.kernels.gates`). On the Triton path the gates are one Triton kernel each way
(`gates_triton`) and the derivative is applied by the dq/dg kernel as it writes (`chunk_hgrn2_bwd`
with `logits`), which is faster than Inductor's gates around the plain kernels; elsewhere
PyTorch's, which Inductor fuses.

Heads of K = V = 1 (HGRN1, expand_ratio 1) are outside the chunk kernels' sizes: there both ops
run the per-channel scan (`hgrn2mini.kernels.scan1`) on CUDA and under Triton's interpreter, and
its third output is the forward's states h [B, T, H] (fp32, as raw bits), which its backward reads.

Eager calls on plain tensors skip the op dispatch: `_Direct` runs the same bodies under an
autograd.Function, launching the kernels as a triton_op's body does (`_raw_launches`).
"""

from __future__ import annotations

import contextlib

import torch
from torch.library import triton_op

from hgrn2mini.kernels import chunk as _chunk
from hgrn2mini.kernels import scan1 as _scan1
from hgrn2mini.kernels.gates import gates, gates_bwd, gates_triton  # gates: also the model's decode step
from hgrn2mini.kernels.launch import plain_eager

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


def _forward(q, g, v, initial_state, scale):
    """Body of both forward ops: (o, final state, kept states); see `_chunk_hgrn2`."""
    if _scan1.takes(q, v):
        o, hT, states = _scan1.forward(q, g, None, v, initial_state, scale, gated=False)
        return o, hT, states.view(torch.int32)
    kept = q.new_empty(0, dtype=_BITS[q.dtype])
    if _chunk.triton_supported(q, v):
        o, hT, states = _chunk.chunk_hgrn2_fwd_with_states(q, g, v, initial_state, scale)
        if _chunk.CONFIG["keep_states"]:
            kept = states.view(_BITS[states.dtype])
    else:
        o, hT = _chunk.chunk_hgrn2_fwd_ref(q, g, v, initial_state, scale)
    return o, hT, kept


def _plain_forward(
    q: torch.Tensor, g: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, final state, kept states). The third output is what the backward may reuse: the Triton
    path's chunk-start states when `kernels.settings.CONFIG["keep_states"]`, or the K = V = 1 scan's
    states, as their raw bits in an integer dtype (so autograd gives it no gradient), else an empty
    tensor."""
    _check(q, g, v, initial_state)
    return _forward(q, g, v, initial_state, scale)


_chunk_hgrn2 = triton_op("hgrn2mini::chunk_hgrn2", mutates_args=())(_plain_forward)


def _kept(states, dtype):
    """The forward's chunk states from the op's third output (raw bits), or None where none were kept."""
    return states.view(dtype) if states is not None and states.numel() > 0 else None


def _backward_body(
    q: torch.Tensor,
    g: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    scale: float,
    states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if _scan1.takes(q, v):
        dq, dg, dv, _, dh0 = _scan1.backward(q, g, None, v, initial_state, _kept(states, torch.float32),
                                             do, dht, scale, gated=False)
        return dq, dg, dv, dh0
    if _chunk.triton_supported(q, v):
        return _chunk.chunk_hgrn2_bwd(q, g, v, initial_state, do, dht, scale, _kept(states, q.dtype))
    return _chunk.chunk_hgrn2_bwd_ref(q, g, v, initial_state, do, dht, scale)


triton_op("hgrn2mini::chunk_hgrn2_bwd", mutates_args=())(_backward_body)


def _setup_context(ctx, inputs, output):
    """Both forward ops: every tensor input (scale comes last) and the kept states."""
    *tensors, scale = inputs
    ctx.save_for_backward(*tensors, output[2])
    ctx.scale = scale
    # Unused outputs get None, not zeros: no [B, H, K, V] or states-sized zeros to make and read.
    ctx.set_materialize_grads(False)


def _backward_op(gated):
    return torch.ops.hgrn2mini.gated_chunk_hgrn2_bwd if gated else torch.ops.hgrn2mini.chunk_hgrn2_bwd


def _saved_backward(ctx, gated, do, dht, backward):
    """Gradients of the forward's inputs (`_input_grads`) by `backward` (a backward op or body) on
    the tensors `_setup_context` saved."""
    *tensors, states = ctx.saved_tensors
    if do is None:  # only the final state was used
        do = torch.zeros_like(tensors[-2])
    # do can arrive with stride 0 (the gradient of `.sum()`): the Triton wrapper makes it dense.
    return _input_grads(gated, tensors, backward(*tensors, do, dht, ctx.scale, states))


def _op_backward(gated):
    """The autograd formula of either forward op: its backward op on the saved tensors."""
    return lambda ctx, do, dht, _: _saved_backward(ctx, gated, do, dht, _backward_op(gated))[1:]


_chunk_hgrn2.register_autograd(_op_backward(False), setup_context=_setup_context)


def _heads(logits: torch.Tensor, v: torch.Tensor) -> tuple[int, ...]:
    return tuple(v.shape[:3]) + (logits.shape[-1] // v.shape[2],)


def _gated_forward(
    q_logits: torch.Tensor, f_logits: torch.Tensor, lower_bound: torch.Tensor | None, v: torch.Tensor,
    initial_state: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`gates`, then the recurrence: (o, final state, kept states) as `_chunk_hgrn2`. On the
    Triton path the gates are one kernel (`gates_triton`)."""
    _check_logits(q_logits, f_logits, lower_bound, v, initial_state)
    heads = _heads(q_logits, v)
    if _scan1.takes(q_logits.view(heads), v):  # the gates inside the scan's kernels
        o, hT, states = _scan1.forward(q_logits, f_logits, lower_bound, v, initial_state, scale, gated=True)
        return o, hT, states.view(torch.int32)
    if _chunk.triton_supported(q_logits.view(heads), v):
        q, g = gates_triton(q_logits, f_logits, lower_bound, _chunk.launcher)
    else:
        q, g = gates(q_logits, f_logits, lower_bound)
    return _forward(q.view(heads), g.view(heads), v, initial_state, scale)


_gated_chunk_hgrn2 = triton_op("hgrn2mini::gated_chunk_hgrn2", mutates_args=())(_gated_forward)


def _gated_backward_body(
    q_logits: torch.Tensor, f_logits: torch.Tensor, lower_bound: torch.Tensor | None, v: torch.Tensor,
    initial_state: torch.Tensor | None, do: torch.Tensor, dht: torch.Tensor | None, scale: float,
    states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d q_logits, d f_logits, d lower_bound (empty without one), dv, d initial state): the gates
    recomputed, the recurrence's backward, then the gates' derivative."""
    heads, shape = _heads(q_logits, v), q_logits.shape
    if _scan1.takes(q_logits.view(heads), v):
        dq_logits, df_logits, dv, dlb, dh0 = _scan1.backward(
            q_logits, f_logits, lower_bound, v, initial_state, _kept(states, torch.float32), do, dht, scale, gated=True)
    elif _chunk.triton_supported(q_logits.view(heads), v):  # the gates' derivative in the dq/dg kernel
        q, g = gates_triton(q_logits, f_logits, lower_bound, _chunk.launcher)
        dq_logits, df_logits, dlb, dv, dh0 = _chunk.chunk_hgrn2_bwd(
            q.view(heads), g.view(heads), v, initial_state, do, dht, scale, _kept(states, q.dtype),
            (q_logits.view(heads), f_logits.view(heads), lower_bound))
    else:
        # From [B*T, H*K] views of the logits, not the [B, T, H*K] tensors the forward read: under
        # torch.compile both ops' bodies land in one graph, where identical expressions of the
        # forward and the backward are merged, and the forward's q, g and intermediates would then
        # be kept rather than computed again.
        flat_q, flat_f = q_logits.flatten(0, 1), f_logits.flatten(0, 1)
        q, g = gates(flat_q, flat_f, lower_bound)
        dq, dg, dv, dh0 = _backward_body(q.view(heads), g.view(heads), v, initial_state, do, dht, scale, states)
        dq_logits, df_logits, dlb = gates_bwd(flat_q, flat_f, lower_bound, g, dq.reshape(q.shape),
                                              dg.reshape(g.shape))
    if dlb is None:
        dlb = v.new_empty(0, dtype=torch.float32)
    return dq_logits.view(shape), df_logits.view(shape), dlb, dv, dh0


triton_op("hgrn2mini::gated_chunk_hgrn2_bwd", mutates_args=())(_gated_backward_body)
_gated_chunk_hgrn2.register_autograd(_op_backward(True), setup_context=_setup_context)


def _check_logits(q_logits, f_logits, lower_bound, v, initial_state) -> None:
    if v.dim() != 4:
        raise ValueError(f"v must be [B, T, H, V] (4 dims), got shape {list(v.shape)}")
    B, T, H, V = v.shape
    if v.dtype not in _FLOAT:
        raise TypeError(f"v must be float32, bfloat16 or float16, got {v.dtype}")
    for name, x in (("q_logits", q_logits), ("f_logits", f_logits)):
        if x.dim() != 3 or list(x.shape[:2]) != [B, T] or x.shape[2] % H:
            raise ValueError(f"{name} must be [B, T, H*K] with B, T, H = {[B, T, H]} as v, got {list(x.shape)}")
        if x.dtype != v.dtype:
            raise TypeError(f"{name} must have v's dtype {v.dtype}, got {x.dtype}")
        if x.device != v.device:
            raise ValueError(f"{name} must be on v's device {v.device}, got {x.device}")
    if f_logits.shape != q_logits.shape:
        raise ValueError(f"f_logits must have q_logits' shape {list(q_logits.shape)}, got {list(f_logits.shape)}")
    if lower_bound is not None and (lower_bound.shape != q_logits.shape[-1:] or lower_bound.dtype != torch.float32):
        raise ValueError(f"lower_bound must be float32 [{q_logits.shape[-1]}], got {lower_bound.dtype} "
                         f"{list(lower_bound.shape)}")
    if lower_bound is not None and lower_bound.device != v.device:
        raise ValueError(f"lower_bound must be on v's device {v.device}, got {lower_bound.device}")
    if initial_state is not None:
        K = q_logits.shape[-1] // H
        check_state("initial_state", initial_state, "[B, H, K, V]", (B, H, K, V), v.device)


def _direct(*tensors) -> bool:
    """Whether a call can run the ops' bodies directly, through `_Direct`: on plain eager tensors
    (`plain_eager`). The `torch.library` ops are what compile and export need (one node each, the
    Triton kernels visible to Inductor). In eager their dispatch layers cost more host time per
    call than the kernels take on the GPU at training sizes; the bodies they dispatch to are the
    same functions."""
    return plain_eager(*tensors)


# How a triton_op runs its body on real tensors: with `wrap_triton` passing launches straight to
# Triton. Outside a triton_op each wrapped launch is otherwise dispatched as a higher-order op,
# which costs several times the kernels' GPU time. (torch.library's own switch; feature-detected.)
_set_wrap_triton = getattr(torch._library.triton, "set_wrap_triton_enabled", None)


def _raw_launches():
    return _set_wrap_triton(False) if _set_wrap_triton is not None else contextlib.nullcontext()


class _Direct(torch.autograd.Function):
    """Eager calls of either op: the op's forward body, and its backward body (`_backward_body`, or
    the gated one), with the kernels launched as the op launches them (`_raw_launches`). With
    create_graph the backward goes through the backward op, whose missing derivative then gives
    the same clear error as the op path."""

    @staticmethod
    def forward(ctx, gated, *inputs):
        with _raw_launches():
            output = (_gated_forward if gated else _plain_forward)(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.gated = gated
        return output[:2]

    @staticmethod
    def backward(ctx, do, dht):
        if torch.is_grad_enabled():  # create_graph: the op, for its error on differentiating again
            return _saved_backward(ctx, ctx.gated, do, dht, _backward_op(ctx.gated))
        with _raw_launches():
            return _saved_backward(ctx, ctx.gated, do, dht, _gated_backward_body if ctx.gated else _backward_body)


def _input_grads(gated, tensors, grads):
    """The backward ops' outputs as gradients of the forward's inputs: None for absent optional
    inputs (lower bound, initial state) and for scale; with `_Direct`, None for its `gated` flag."""
    initial_state = tensors[-1]
    if gated:
        dq_logits, df_logits, dlb, dv, dh0 = grads
        return (None, dq_logits, df_logits, dlb if tensors[2] is not None else None, dv,
                dh0 if initial_state is not None else None, None)
    dq, dg, dv, dh0 = grads
    return None, dq, dg, dv, (dh0 if initial_state is not None else None), None


def gated_chunk_hgrn2(
    q_logits: torch.Tensor,
    f_logits: torch.Tensor,
    lower_bound: torch.Tensor | None,
    v: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`chunk_hgrn2` with HGRN2's gates computed inside from their logits: q = silu(q_logits),
    g = log(lb + (1 - lb) sigmoid(f_logits)) (see `gates`). Same result as `gates` followed by
    `chunk_hgrn2`; for training it keeps only the logits for the backward, never q or g.

    Args:
        q_logits, f_logits: [B, T, H*K] in v's dtype; lower_bound: [H*K] float32 or None (lb = 0).
        v, initial_state, scale: as `chunk_hgrn2`.
    Returns:
        o [B, T, H, V] and the final state [B, H, K, V] float32.
    """
    if scale is None:
        scale = (q_logits.shape[-1] // v.shape[2]) ** -0.5
    if _direct(q_logits, f_logits, lower_bound, v, initial_state):
        return _Direct.apply(True, q_logits, f_logits, lower_bound, v, initial_state, float(scale))
    o, hT, _ = torch.ops.hgrn2mini.gated_chunk_hgrn2(q_logits, f_logits, lower_bound, v, initial_state, float(scale))
    return o, hT


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
    if _direct(q, g, v, initial_state):
        return _Direct.apply(False, q, g, v, initial_state, float(scale))
    o, hT, _ = torch.ops.hgrn2mini.chunk_hgrn2(q, g, v, initial_state, float(scale))
    return o, hT

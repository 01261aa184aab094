"""Argument checks for the model: each error names the argument, what was expected and what came."""

from __future__ import annotations

import math
from typing import Any

import torch

ATTN_MODES = ("chunk", "fused_chunk", "fused_recurrent")  # fla's kernels; all compute the same thing
ACTS = ("swish", "silu")


def check_config(c: Any) -> None:
    """Validates an HGRN2Config and fills its derived fields (num_heads / expand_ratio,
    intermediate_size), as fla's constructor does."""
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_labels"):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    D = c.hidden_size
    if c.expand_ratio is None and c.num_heads is None:
        raise ValueError("one of expand_ratio or num_heads must be given, got both None")
    if c.expand_ratio is None:
        if c.num_heads < 1 or D % c.num_heads:
            raise ValueError(f"hidden_size ({D}) must be divisible by num_heads ({c.num_heads})")
        c.expand_ratio = D // c.num_heads
    if c.expand_ratio < 1 or D % c.expand_ratio:
        raise ValueError(f"hidden_size ({D}) must be divisible by expand_ratio ({c.expand_ratio})")
    if c.num_heads is None:
        c.num_heads = D // c.expand_ratio
    elif c.num_heads * c.expand_ratio != D:
        raise ValueError(f"num_heads * expand_ratio must equal hidden_size ({D}), "
                         f"got num_heads={c.num_heads}, expand_ratio={c.expand_ratio}")
    if c.use_short_conv:
        raise ValueError("use_short_conv=True is not implemented in hgrn2mini (fla's HGRN2 checkpoints do not "
                         "use it); set use_short_conv=False")
    if c.attn_mode not in ATTN_MODES:
        raise ValueError(f"attn_mode must be one of {ATTN_MODES}, got {c.attn_mode!r}")
    if c.hidden_act not in ACTS:
        raise ValueError(f"hidden_act must be one of {ACTS} (SwiGLU), got {c.hidden_act!r}")
    if not isinstance(c.bidirectional, bool):
        raise ValueError(f"bidirectional must be a bool, got {c.bidirectional!r}")
    if c.hidden_ratio is None:
        c.hidden_ratio = 4
    if c.intermediate_size is None:
        c.intermediate_size = 256 * math.ceil(int(D * c.hidden_ratio * 2 / 3) / 256)
    if c.pad_token_id is not None and not 0 <= c.pad_token_id < c.vocab_size:
        raise ValueError(f"pad_token_id must be in [0, vocab_size={c.vocab_size}) or None, got {c.pad_token_id}")


def check_config_dict(d: dict[str, Any]) -> None:
    """Refuses an fla config.json that describes another model or an fla feature that changes the
    architecture, rather than loading something else."""
    model_type = d.get("model_type", "hgrn2")
    if model_type != "hgrn2":
        raise ValueError(f"config model_type must be 'hgrn2', got {model_type!r}: not an HGRN2 model")
    if d.get("attn") is not None:
        raise ValueError(f"config attn (hybrid softmax-attention layers) is not supported, got {d['attn']!r}")
    if d.get("attnres_block_size") is not None:
        raise ValueError(f"config attnres_block_size is not supported, got {d['attnres_block_size']!r}")


def check_ids(x: Any, name: str, high: int, high_name: str, ignore: bool = False, shape: Any = None) -> None:
    """x must be an integer tensor of values in [0, high) (-100 also with `ignore`), of `shape`
    when given, else [B, T] with T >= 1."""
    if not is_int_tensor(x):
        raise TypeError(f"{name} must be an integer tensor of ids, got {describe(x)}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    if shape is None and x.dim() != 2:
        raise ValueError(f"{name} must be [B, T] (2 dims), got shape {list(x.shape)}")
    if shape is None and x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one position, got shape {list(x.shape)}")
    # A data-dependent check: a host sync in eager, impossible inside a traced graph (where the
    # lookup itself still fails on a bad value).
    if is_tracing():
        return
    bad = (x < 0) | (x >= high)
    if ignore:
        bad &= x != -100
    if bad.any():
        allowed = f"[0, {high_name}={high})" + (" or -100 (ignored)" if ignore else "")
        lo, hi = x[bad].min().item(), x[bad].max().item()
        raise ValueError(f"{name} must be in {allowed}, got {int(bad.sum())} values outside it, in [{lo}, {hi}]")


def check_attention_mask(attention_mask: Any, input_ids: torch.Tensor) -> None:
    """attention_mask: a bool or integer tensor of input_ids' shape and device, of 0s and 1s."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype.is_floating_point:
        raise TypeError(f"attention_mask must be a bool or integer tensor [B, T], got {describe(attention_mask)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have input_ids' shape {list(input_ids.shape)}, got {list(attention_mask.shape)}"
        )
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask must be on input_ids' device {input_ids.device}, got {attention_mask.device}")
    if not is_tracing() and ((attention_mask != 0) & (attention_mask != 1)).any():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token), got other values")


def is_int_tensor(x: Any) -> bool:
    if not isinstance(x, torch.Tensor):
        return False
    return not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)


def describe(x: Any) -> str:
    return f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def is_tracing() -> bool:
    """True under torch.compile or torch.export, and while a CUDA graph is being captured on the
    current stream: where data-dependent checks cannot run (reading a value on the host would end
    a capture; examples/graphstep.py captures whole training steps). Eager calls outside a
    capture check values as always; a graph's replays check nothing (the eager warm-up steps
    before a capture still do)."""
    compiler = getattr(torch, "compiler", None)
    if any(getattr(compiler, n, lambda: False)() for n in ("is_compiling", "is_exporting")):
        return True
    # is_initialized first: a capture needs CUDA set up, and on a CPU-only build the capture
    # query itself raises.
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()

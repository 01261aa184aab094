"""HGRN2 (Qin et al. 2024, arXiv 2404.07904) as one readable PyTorch file.

Names follow fla (flash-linear-attention), so an fla checkpoint loads key for key. The code reads
in the order of the paper's equations; per layer, with D = hidden_size, K = expand_ratio (head key
dim, the "state expansion"), H = D / K heads and V = D / H (head value dim):

    code name            paper                          shape
    ---------            -----                          -----
    q = silu(q_proj x)   output gate o_t                [B, T, H, K]
    f_proj x             forget-gate logit              [B, T, D]
    g = log f            log forget gate, f in (lb, 1)  [B, T, H, K] fp32
    k = 1 - f            input gate, tied to f          (derived inside the op, never stored)
    v = i_proj x         input i_t                      [B, T, H, V]
    state                h_t = diag(f_t) h_{t-1} + (1 - f_t) i_t^T    [B, H, K, V] fp32
    o                    y_t = o_t^T h_t  (q scaled by K**-0.5)        [B, T, H, V]
    lower_bounds         gamma (HGRN1's layer-wise lower bound, softmax + cumsum over layers)

Dtypes are stated once: gates, cumulative sums, recurrent states and norms in fp32; inputs,
outputs and matmuls in the activation dtype (the parameters' dtype).

The recurrence itself is an op: `hgrn2mini.ops.gated_chunk_hgrn2`, which takes the two gate
projections and computes the gates in log space inside (`hgrn2mini.ops.gates`, so that training
keeps the projections for the backward, never the fp32 gates), then runs `chunk_hgrn2`.
Everything around it (projections, norms) is plain PyTorch, so `torch.compile` fuses it around
the op.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hgrn2mini import checkpoint
from hgrn2mini.ops import check_state, gated_chunk_hgrn2, gates

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

_ATTN_MODES = ("chunk", "fused_chunk", "fused_recurrent")  # fla's kernels; all compute the same thing
_ACTS = ("swish", "silu")

# Presets by name. Sizes of the published ones follow the paper / fla; the small ones are chosen
# for this library's own runs.
_PRESETS: dict[str, dict[str, Any]] = {
    # Trains on a 2-core CPU in minutes: ~2.1M parameters, H = 4 heads of K = V = 32, a vocabulary
    # small enough that the embedding and head do not dominate.
    "tiny": dict(vocab_size=4096, hidden_size=128, num_hidden_layers=4, expand_ratio=32),
    # GPT-2-small scale (~134M parameters) for single-GPU runs and benchmarks.
    "small": dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, expand_ratio=128),
    # The paper's 0.39B model (374M parameters with untied embeddings).
    "374M": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, expand_ratio=128),
    # fla's hgrn2-1.3B-100B.
    "1.3B": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=24, expand_ratio=128),
}


@dataclass
class HGRN2Config:
    """fla's `HGRN2Config` fields and defaults (config.json is interchangeable with fla's)."""

    vocab_size: int = 32000
    hidden_size: int = 2048  # D
    num_hidden_layers: int = 24  # L
    attn_mode: str = "chunk"  # kept for fla compatibility; one op serves every mode here
    num_heads: int | None = None  # H = D / expand_ratio when left None
    expand_ratio: int | None = 128  # K, the head key dim: the state is K x V per head
    use_short_conv: bool = False  # not implemented (fla's HGRN2 checkpoints do not use it)
    conv_size: int = 4
    use_lower_bound: bool = True
    hidden_ratio: int | None = 4
    intermediate_size: int | None = None  # 256 * ceil(int(D * hidden_ratio * 2/3) / 256) when None
    hidden_act: str = "swish"
    max_position_embeddings: int = 2048  # unused by a recurrent model; kept for fla compatibility
    elementwise_affine: bool = True  # g_norm has a weight
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int = 1
    eos_token_id: int = 2
    use_cache: bool = True
    # With labels, the loss without materializing the logits (`linear_cross_entropy`); the output's
    # logits are then None. fla's name and default; examples/train.py turns it on.
    fuse_linear_cross_entropy: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        D = self.hidden_size
        if self.expand_ratio is None and self.num_heads is None:
            raise ValueError("one of expand_ratio or num_heads must be given, got both None")
        if self.expand_ratio is None:
            if self.num_heads < 1 or D % self.num_heads:
                raise ValueError(
                    f"hidden_size ({D}) must be divisible by num_heads ({self.num_heads})"
                )
            self.expand_ratio = D // self.num_heads
        if self.expand_ratio < 1 or D % self.expand_ratio:
            raise ValueError(
                f"hidden_size ({D}) must be divisible by expand_ratio ({self.expand_ratio})"
            )
        if self.num_heads is None:
            self.num_heads = D // self.expand_ratio
        elif self.num_heads * self.expand_ratio != D:
            raise ValueError(
                f"num_heads * expand_ratio must equal hidden_size ({D}), "
                f"got num_heads={self.num_heads}, expand_ratio={self.expand_ratio}"
            )
        if self.use_short_conv:
            raise ValueError(
                "use_short_conv=True is not implemented in hgrn2mini (fla's HGRN2 checkpoints do not "
                "use it); set use_short_conv=False"
            )
        if self.attn_mode not in _ATTN_MODES:
            raise ValueError(f"attn_mode must be one of {_ATTN_MODES}, got {self.attn_mode!r}")
        if self.hidden_act not in _ACTS:
            raise ValueError(f"hidden_act must be one of {_ACTS} (SwiGLU), got {self.hidden_act!r}")
        if self.hidden_ratio is None:
            self.hidden_ratio = 4
        if self.intermediate_size is None:
            self.intermediate_size = 256 * math.ceil(int(D * self.hidden_ratio * 2 / 3) / 256)
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"pad_token_id must be in [0, vocab_size={self.vocab_size}) or None, got {self.pad_token_id}"
            )

    @property
    def head_k_dim(self) -> int:  # K
        return self.expand_ratio

    @property
    def head_v_dim(self) -> int:  # V
        return self.hidden_size // self.num_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> HGRN2Config:
        if name not in _PRESETS:
            raise ValueError(f"preset name must be one of {sorted(_PRESETS)}, got {name!r}")
        return cls(**{**_PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """fla's config.json keys, plus the two that identify the model to fla and transformers."""
        return {"model_type": "hgrn2", "architectures": ["HGRN2ForCausalLM"], **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HGRN2Config:
        """Reads fla's config.json; keys that only steer fla's fused kernels (fuse_norm, ...) are ignored."""
        model_type = d.get("model_type", "hgrn2")
        if model_type != "hgrn2":
            raise ValueError(f"config model_type must be 'hgrn2', got {model_type!r}: not an HGRN2 model")
        # fla features that change the architecture: refuse rather than load something else.
        if d.get("attn") is not None:
            raise ValueError(
                f"config attn (hybrid softmax-attention layers) is not supported, got {d['attn']!r}"
            )
        if d.get("attnres_block_size") is not None:
            raise ValueError(
                f"config attnres_block_size is not supported, got {d['attnres_block_size']!r}"
            )
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------------------------
# The token mixer
# ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back to the input dtype (fla's reference numerics)."""

    def __init__(self, hidden_size: int, eps: float, elementwise_affine: bool = True, dtype=None):
        super().__init__()
        self.eps = eps
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)


# The forget logit that padding gets: sigmoid(1e4) = 1 and log sigmoid(1e4) = 0 exactly in fp32
# (exp(-1e4) underflows to 0), and 1e4 is finite in bf16 and fp16.
MASKED_F_LOGIT = 1e4


def hgrn2_recurrent_step(
    q: torch.Tensor, g: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence, exact, in plain PyTorch (decode: no kernel, compile-friendly).

    Args:
        q: [B, H, K] query, g: [B, H, K] fp32 log forget gate, v: [B, H, V].
        state: [B, H, K, V] fp32 or None (zeros).
    Returns:
        o [B, H, V] in v's dtype and the new state [B, H, K, V] fp32.
    """
    k = -torch.expm1(g)  # 1 - f, accurate when f is close to 1
    kv = k[..., :, None] * v.float()[..., None, :]  # [B, H, K, V]
    state = kv if state is None else g.exp()[..., :, None] * state + kv
    o = torch.einsum("bhk,bhkv->bhv", q.float() * scale, state)
    return o.to(v.dtype), state


class HGRN2Attention(nn.Module):
    """HGRN2's token mixer (fla's name): gated linear attention with the key tied to the forget gate."""

    def __init__(self, config: HGRN2Config, layer_idx: int):
        super().__init__()
        D = config.hidden_size
        # A bool, not the layer index, is what forward reads: the compiler specializes on it, and
        # so every layer after the first shares one graph (compile_regions).
        self.bounded = layer_idx > 0
        self.num_heads = config.num_heads  # H
        self.head_k_dim = config.head_k_dim  # K
        self.head_v_dim = config.head_v_dim  # V
        self.q_proj = nn.Linear(D, D, bias=False)  # H*K = D
        self.f_proj = nn.Linear(D, D, bias=False)
        self.i_proj = nn.Linear(D, D, bias=False)  # H*V = D
        # eps 1e-5, not config.norm_eps: fla stores norm_eps on its g_norm but its forward calls
        # rms_norm_linear(o, g_norm.weight, ...) without eps, whose default is 1e-5, and that is
        # what fla's checkpoints were trained with.
        self.g_norm = RMSNorm(D, 1e-5, config.elementwise_affine, dtype=torch.float32)
        self.o_proj = nn.Linear(D, D, bias=False)

    def forward(
        self, x: torch.Tensor, lower_bound: torch.Tensor | None, state: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, D]; lower_bound: [D] fp32 or None; state: [B, H, K, V] fp32 or None;
        attention_mask: [B, T] bool or 0/1, or None: a 0 position leaves the state unchanged."""
        B, T, D = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        v = self.i_proj(x).view(B, T, H, V)
        lb = lower_bound if self.bounded else None  # lb[0] = 0 exactly; log(0) would give NaN grads
        scale = K**-0.5
        f_logits = self.f_proj(x)
        if attention_mask is not None:
            # Masked position: f = 1 (g = log f = 0 and k = 1 - f = 0 exactly, lower bound or not),
            # so h_t = h_{t-1}. Finite, unlike +inf: gates and their gradient stay free of inf * 0.
            f_logits = f_logits.masked_fill(attention_mask[..., None] == 0, MASKED_F_LOGIT)
        if T > 1:
            # The gates (`hgrn2mini.ops.gates`) computed inside the op: its backward keeps the two
            # projections' outputs and recomputes q and g (fp32) instead of keeping them.
            o, state = gated_chunk_hgrn2(self.q_proj(x), f_logits, lb, v, state, scale)  # [B, T, H, V]
        else:
            q, g = gates(self.q_proj(x), f_logits, lb)
            o, state = hgrn2_recurrent_step(q.view(B, H, K), g.view(B, H, K), v[:, 0], state, scale)
            o = o[:, None]  # [B, 1, H, V]
        o = self.g_norm(o.reshape(B, T, D))
        return self.o_proj(o), state


# ----------------------------------------------------------------------------------------------
# The block and the model
# ----------------------------------------------------------------------------------------------


class HGRN2MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, config: HGRN2Config):
        super().__init__()
        D, I = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, I, bias=False)
        self.up_proj = nn.Linear(D, I, bias=False)
        self.down_proj = nn.Linear(I, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HGRN2Block(nn.Module):
    """Pre-norm: x += mixer(norm(x)); x += mlp(norm(x))."""

    def __init__(self, config: HGRN2Config, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = HGRN2Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = HGRN2MLP(config)

    def forward(
        self, x: torch.Tensor, lower_bound: torch.Tensor | None, state: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y, state = self.attn(self.attn_norm(x), lower_bound, state, attention_mask)
        x = x + y
        x = x + self.mlp(self.mlp_norm(x))
        return x, state


class HGRN2Model(nn.Module):
    """Embeddings, L blocks, final norm. Returns hidden states [B, T, D] and the stacked state."""

    def __init__(self, config: HGRN2Config):
        super().__init__()
        self.config = config
        D, L = config.hidden_size, config.num_hidden_layers
        self.embeddings = nn.Embedding(config.vocab_size, D, padding_idx=config.pad_token_id)
        if config.use_lower_bound:
            self.lower_bounds = nn.Parameter(torch.zeros(L, D))  # P; zeros -> lb[l] = l / L
        self.layers = nn.ModuleList(HGRN2Block(config, i) for i in range(L))
        self.norm = RMSNorm(D, config.norm_eps)

    def state_shape(self, batch_size: int) -> tuple[int, int, int, int, int]:
        c = self.config
        return (c.num_hidden_layers, batch_size, c.num_heads, c.head_k_dim, c.head_v_dim)

    def forward(
        self, input_ids: torch.Tensor, state: torch.Tensor | None = None, return_state: bool = False,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids: [B, T] int; state: [L, B, H, K, V] fp32 or None; attention_mask: [B, T] or None."""
        x = self.embeddings(input_ids)  # [B, T, D]
        lower_bounds = None
        if self.config.use_lower_bound:
            # lb = cumsum(softmax(P over layers)) - S[0]: lb[0] = 0, increasing with depth, < 1.
            S = self.lower_bounds.softmax(0, dtype=torch.float32)  # [L, D]
            lower_bounds = S.cumsum(0) - S[0]
        new_states = []
        for i, layer in enumerate(self.layers):
            lb = lower_bounds[i] if lower_bounds is not None else None
            x, s = layer(x, lb, state[i] if state is not None else None, attention_mask)
            new_states.append(s)
        x = self.norm(x)
        if state is None and not return_state:
            return x, None
        return x, torch.stack(new_states)  # [L, B, H, K, V]


# ----------------------------------------------------------------------------------------------
# The fused loss head: cross-entropy of x @ weight^T without the [N, vocab] logits
# ----------------------------------------------------------------------------------------------


# Logits per chunk of rows, at most: 512 MB in fp32. Under torch.compile the loop over chunks is
# unrolled, and each chunk adds to the compile time (on a 2-core CPU, 8 chunks 16.8 s, 2 chunks
# 10.7 s, the logits path 11.9 s; 2026-11-24): few, equal chunks (4 of 4096 rows at 8 x 2048
# tokens, vocabulary 32000).
CE_CHUNK_LOGITS = 1 << 27


def _cross_entropy_chunks(x, weight, targets, grads: bool):
    """Loss sum over rows, count of rows not ignored (-100), and with `grads` the gradients of the
    mean loss for x and weight (fp32). Rows go in equal chunks of at most CE_CHUNK_LOGITS / vocab
    (the last may be shorter); each chunk's logits are rounded to the matmul's dtype as `lm_head`
    gives them, then fp32."""
    count = (targets != -100).sum()
    N = x.shape[0]
    chunks = -(-N // max(1, CE_CHUNK_LOGITS // weight.shape[0]))
    rows = -(-N // chunks)
    total = x.new_zeros((), dtype=torch.float32)
    dx, dw = [], torch.zeros_like(weight, dtype=torch.float32) if grads else None
    for r in range(0, N, rows):
        xc, tc = x[r : r + rows], targets[r : r + rows]
        logits = (xc @ weight.T).float()  # [rows, vocab]
        lse = torch.logsumexp(logits, -1)
        keep = tc != -100
        label = torch.where(keep, tc, 0)[:, None]
        total = total + torch.where(keep, lse - logits.gather(1, label)[:, 0], 0.0).sum()
        if grads:  # d mean / d logits = (softmax - onehot) / count on the rows kept
            onehot = torch.arange(logits.shape[1], device=x.device) == label  # elementwise: one fused kernel
            dl = ((torch.exp(logits - lse[:, None]) - onehot.float()) * (keep[:, None] / count)).to(x.dtype)
            dx.append(dl @ weight)
            dw = dw + (dl.T @ xc).float()
    return total, count, (torch.cat(dx) if grads else None), dw


class _LinearCrossEntropy(torch.autograd.Function):
    """The gradients are computed in the forward, chunk by chunk, and kept: [N, D] and [vocab, D]
    instead of the [N, vocab] logits and their gradient."""

    @staticmethod
    def forward(ctx, x, weight, targets):
        total, count, dx, dw = _cross_entropy_chunks(x, weight, targets, grads=True)
        ctx.save_for_backward(dx, dw)
        ctx.dtypes = x.dtype, weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad):
        dx, dw = ctx.saved_tensors
        return (grad * dx).to(ctx.dtypes[0]), (grad * dw).to(ctx.dtypes[1]), None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(x @ weight.T, targets, ignore_index=-100) (mean over the rows kept) without
    the logits: x [N, D], weight [vocab, D], targets [N]. Peak memory is one chunk's logits; for
    training the gradients are made in the forward (the same matmuls as the unfused backward)."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be [N, D] with N >= 1, got shape {list(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be [vocab, D] with D = {x.shape[1]} as x, got shape {list(weight.shape)}")
    if targets.shape != x.shape[:1]:
        raise ValueError(f"targets must be [N] = [{x.shape[0]}] as x, got shape {list(targets.shape)}")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets)
    total, count, _, _ = _cross_entropy_chunks(x, weight, targets, grads=False)
    return total / count


class CausalLMOutput(NamedTuple):
    loss: torch.Tensor | None  # scalar fp32, when labels were given
    logits: torch.Tensor | None  # [B, T, vocab]; None with labels when config.fuse_linear_cross_entropy
    state: torch.Tensor | None  # [L, B, H, K, V] fp32, when state was given or return_state=True


# torch.export.save must name the output's type to serialize it; a namedtuple needs registering
# (private API, the one the error message asks for; feature-detected).
_register_namedtuple = getattr(torch.utils._pytree, "_register_namedtuple", None)
if _register_namedtuple is not None:
    _register_namedtuple(CausalLMOutput, serialized_type_name="hgrn2mini.model.CausalLMOutput")


class HGRN2ForCausalLM(nn.Module):
    """HGRN2 language model: logits, loss when labels are given, recurrent state in and out."""

    def __init__(self, config: HGRN2Config):
        super().__init__()
        self.config = config
        self.model = HGRN2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embeddings.weight

    def _init_weights(self, module: nn.Module) -> None:
        # fla's init: normal(0, initializer_range) for every Linear and the embedding (the padding
        # row included, as fla's _init_weights overwrites it); norms ones and lower bounds zeros
        # are set where they are created.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    # -- input checks: errors name the argument, what was expected and what came ---------------

    def _check_input_ids(self, input_ids: torch.Tensor, name: str = "input_ids") -> None:
        if not _is_int_tensor(input_ids):
            raise TypeError(f"{name} must be an integer tensor of token ids, got {_describe(input_ids)}")
        if input_ids.dim() != 2:
            raise ValueError(f"{name} must be [B, T] (2 dims), got shape {list(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError(f"{name} must have at least one token, got shape {list(input_ids.shape)}")
        # A data-dependent check: a host sync in eager, impossible inside a traced graph (where
        # the embedding lookup itself still fails on a bad id).
        if not _is_tracing():
            V = self.config.vocab_size
            bad = (input_ids < 0) | (input_ids >= V)
            if bad.any():
                lo, hi = input_ids.min().item(), input_ids.max().item()
                raise ValueError(
                    f"{name} must be token ids in [0, vocab_size={V}), got values in [{lo}, {hi}]"
                )

    # -- forward -------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        return_state: bool = False,
        attention_mask: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """
        Args:
            input_ids: [B, T] integer token ids in [0, vocab_size).
            labels: [B, T] integer targets or None; shifted inside (position t predicts labels[t+1]),
                -100 is ignored.
            state: [L, B, H, K, V] fp32 recurrent state to continue from, or None (zeros).
            return_state: return the new state even when none was given.
            attention_mask: [B, T] bool or 0/1 integers, or None (all 1). A 0 position leaves every
                layer's state unchanged (its forget gate is 1), exactly, gradients included: a
                left-padded row computes what the row alone computes. The logits at 0 positions
                mean nothing; give them labels -100.
        Returns:
            CausalLMOutput(loss fp32 scalar or None, logits [B, T, vocab] (None when labels are
            given and config.fuse_linear_cross_entropy: the loss is then computed without them),
            state or None).
        """
        self._check_input_ids(input_ids)
        if labels is not None:
            if not _is_int_tensor(labels):
                raise TypeError(f"labels must be an integer tensor [B, T], got {_describe(labels)}")
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels must have input_ids' shape {list(input_ids.shape)}, got {list(labels.shape)}"
                )
        if state is not None:
            want = self.model.state_shape(input_ids.shape[0])
            check_state("state", state, "[L, B, H, K, V]", want, input_ids.device, "input_ids' device ")
        if attention_mask is not None:
            check_attention_mask(attention_mask, input_ids)
        x, new_state = self.model(input_ids, state, return_state, attention_mask)
        logits, loss = self._head(x, labels)
        return CausalLMOutput(loss, logits, new_state)

    def _head(self, x: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if labels is None:
            return self.lm_head(x), None  # [B, T, vocab]
        targets = F.pad(labels[:, 1:], (0, 1), value=-100).flatten()  # position t predicts labels[t + 1]
        if self.config.fuse_linear_cross_entropy:
            return None, linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets)
        logits = self.lm_head(x)
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets, ignore_index=-100)

    def compile_regions(self, **compile_kwargs: Any) -> HGRN2ForCausalLM:
        """Compiles each block and the output head (logits and loss) on its own, in place.

        Regional compilation: the blocks share their code, so the compiler builds two graphs
        (layer 0, whose gate has no lower bound, and the rest) however deep the model is, where
        `torch.compile(model)` builds one graph as deep as the model. Same numbers, a much shorter
        first step; the embedding lookup and the lower-bound softmax stay eager. Returns self.
        """
        for block in self.model.layers:
            block.compile(**compile_kwargs)
        self._head = torch.compile(self._head, **compile_kwargs)
        return self

    # -- generation ----------------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *args: Any, **kwargs: Any):
        """Generates up to max_new_tokens tokens after input_ids: `hgrn2mini.generation.generate`
        (the arguments and the returned `Generation` are documented there). Iterating the result
        streams one [B] tensor of tokens per step; `.result()` gives tokens, lengths and state."""
        from hgrn2mini import generation  # generation imports this module

        return generation.generate(self, input_ids, max_new_tokens, *args, **kwargs)

    # -- checkpoints ---------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Writes config.json + model.safetensors in fla's layout, each atomically."""
        checkpoint.save_pretrained(self, self.config.to_dict(), directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> HGRN2ForCausalLM:
        """Loads our or fla's checkpoint (safetensors only, sharded or not).

        dtype None keeps the stored dtypes; a dtype casts every parameter, as `model.to(dtype)`.
        """
        config = HGRN2Config.from_dict(checkpoint.load_config(directory))
        with torch.device("meta"):  # no time spent on an init that the checkpoint overwrites
            model = cls(config)
        checkpoint.load_pretrained(model, directory, device=device)
        if dtype is not None:
            model.to(dtype)
        return model


def check_attention_mask(attention_mask: Any, input_ids: torch.Tensor) -> None:
    """attention_mask: a bool or integer tensor of input_ids' shape and device, of 0s and 1s."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype.is_floating_point:
        raise TypeError(f"attention_mask must be a bool or integer tensor [B, T], got {_describe(attention_mask)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have input_ids' shape {list(input_ids.shape)}, got {list(attention_mask.shape)}"
        )
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask must be on input_ids' device {input_ids.device}, got {attention_mask.device}")
    if not _is_tracing() and ((attention_mask != 0) & (attention_mask != 1)).any():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token), got other values")


def _is_int_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not (
        x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool
    )


def _describe(x: Any) -> str:
    return f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def _is_tracing() -> bool:
    """True under torch.compile or torch.export, where data-dependent checks cannot run."""
    compiler = getattr(torch, "compiler", None)
    for name in ("is_compiling", "is_exporting"):
        fn = getattr(compiler, name, None)
        if fn is not None and fn():
            return True
    return False

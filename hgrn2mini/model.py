"""HGRN2 (Qin et al. 2024, arXiv 2404.07904) as one readable PyTorch file.

Names follow fla (flash-linear-attention), so an fla checkpoint loads key for key. Per layer, with
D = hidden_size, K = expand_ratio (head key dim, the "state expansion"), H = D / K heads and
V = D / H (head value dim), `HGRN2Attention.forward` writes the equations (1)-(7) where they are
computed: output gate q, forget gate f (bounded below by HGRN1's layer-wise `lower_bounds`, softmax
and cumsum over layers), key k = 1 - f, input i (the code's v), state h_t [B, H, K, V] and output y.

Dtypes are stated once: gates, cumulative sums, recurrent states and norms in fp32; inputs,
outputs and matmuls in the activation dtype (the parameters' dtype).

The recurrence itself is an op, `hgrn2mini.ops.gated_chunk_hgrn2`: it takes the two gate
projections and computes the gates in log space inside (`hgrn2mini.ops.gates`, so that training
keeps the projections for the backward, never the fp32 gates), then runs `chunk_hgrn2`. Around
it, plain PyTorch, which `torch.compile` fuses. With `bidirectional=True` the mixer also runs the
recurrence reversed and sums both directions (for `HGRN2ForSequenceClassification`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hgrn2mini import checkpoint
from hgrn2mini.checks import check_attention_mask, check_ids
from hgrn2mini.config import HGRN2Config
# MASKED_F_LOGIT: the forget logit that padding gets, f = 1 and k = 1 - f = 0 exactly (kernels/gates.py)
from hgrn2mini.kernels.gates import MASKED_F_LOGIT
from hgrn2mini.kernels.norm import rms_norm
from hgrn2mini.loss import linear_cross_entropy
from hgrn2mini.ops import check_state, gated_chunk_hgrn2, gates

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
        # y = x / sqrt(mean(x^2) + eps) * weight in fp32, then x's dtype: one Triton kernel each way
        # for eager CUDA tensors, the PyTorch formula elsewhere (`kernels.norm.rms_norm_ref`).
        return rms_norm(x, self.weight, self.eps)


def hgrn2_recurrent_step(
    q: torch.Tensor, g: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence, exact, in plain PyTorch (decode: no kernel, compile-friendly).
    q: [B, H, K], g: [B, H, K] fp32 log forget gate, v: [B, H, V], state: [B, H, K, V] fp32 or None
    (zeros). Returns o [B, H, V] in v's dtype and the new state [B, H, K, V] fp32."""
    k = -torch.expm1(g)  # 1 - f, accurate when f is close to 1
    kv = k[..., :, None] * v.float()[..., None, :]  # [B, H, K, V]
    state = kv if state is None else g.exp()[..., :, None] * state + kv
    o = torch.einsum("bhk,bhkv->bhv", q.float() * scale, state)
    return o.to(v.dtype), state


class HGRN2Attention(nn.Module):
    """HGRN2's token mixer (fla's name): gated linear attention with the key tied to the forget gate.

    bidirectional: (5)-(6) also run from the end of the sequence to its start with the same q, f,
    i, and the two outputs are summed before the norm (7). Shared parameters keep the mixer at
    4 D^2, as the causal one and a softmax-attention layer of the same width, so a causal (fla)
    checkpoint loads key for key, and the reverse pass costs one op call, no projection. Each
    direction counts position t's own input once (twice in the sum). RMSNorm makes the sum and
    the mean the same up to its eps.
    """

    def __init__(self, config: HGRN2Config, layer_idx: int):
        super().__init__()
        D = config.hidden_size
        # A bool, not the layer index, is what forward reads: the compiler specializes on it, and
        # so every layer after the first shares one graph (compile_regions).
        self.bounded = layer_idx > 0
        self.bidirectional = config.bidirectional
        self.num_heads = config.num_heads  # H
        self.head_k_dim = config.head_k_dim  # K
        self.head_v_dim = config.head_v_dim  # V
        self.q_proj = nn.Linear(D, D, bias=False)  # W_q, H*K = D
        self.f_proj = nn.Linear(D, D, bias=False)  # W_f
        self.i_proj = nn.Linear(D, D, bias=False)  # W_i, H*V = D
        # eps 1e-5, not config.norm_eps: fla stores norm_eps on its g_norm but its forward calls
        # rms_norm_linear(o, g_norm.weight, ...) without eps, whose default is 1e-5, and that is
        # what fla's checkpoints were trained with.
        self.g_norm = RMSNorm(D, 1e-5, config.elementwise_affine, dtype=torch.float32)
        self.o_proj = nn.Linear(D, D, bias=False)  # W_o

    def forward(
        self, x: torch.Tensor, lower_bound: torch.Tensor | None, state: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [B, T, D]; lower_bound: [D] fp32 or None; state: [B, H, K, V] fp32 or None (causal
        only); attention_mask: [B, T] bool or 0/1, or None: a 0 position (padding) leaves the state
        unchanged. Returns [B, T, D] and the new state (None when bidirectional)."""
        B, T, D = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        lb = lower_bound if self.bounded else None  # lb[0] = 0 exactly; log(0) would give NaN grads
        # (1) q_t = silu(x_t W_q)                    output gate           } computed inside the op
        # (2) f_t = lb + (1 - lb) sigmoid(x_t W_f)   forget gate in (lb, 1)} from the two logits, in
        # (3) k_t = 1 - f_t                          key, tied to f        } fp32 log space (g = log f)
        # (4) i_t = x_t W_i                          input, no activation
        q_logits, f_logits = self.q_proj(x), self.f_proj(x)  # [B, T, H*K]
        v = self.i_proj(x).view(B, T, H, V)
        if attention_mask is not None:
            # Padding: f = 1 (g = log f = 0 and k = 1 - f = 0 exactly, lower bound or not), so
            # h_t = h_{t-1}. Finite, unlike +inf: gates and their gradient stay free of inf * 0.
            f_logits = f_logits.masked_fill(attention_mask[..., None] == 0, MASKED_F_LOGIT)
        # (5) h_t = diag(f_t) h_{t-1} + (1 - f_t) i_t^T     state [B, H, K, V] fp32
        # (6) y_t = q_t^T h_t   (q scaled by K**-0.5)       o [B, T, H, V]
        scale = K**-0.5
        if T > 1 or self.bidirectional:
            # The gates' backward keeps the two projections' outputs, not q and g (fp32).
            o, state = gated_chunk_hgrn2(q_logits, f_logits, lb, v, state, scale)
            if self.bidirectional:
                # (5)-(6) reversed, h_t = diag(f_t) h_{t+1} + (1 - f_t) i_t^T: the same op on the
                # sequence flipped in time, its output flipped back; the two directions summed.
                o_rev, _ = gated_chunk_hgrn2(q_logits.flip(1), f_logits.flip(1), lb, v.flip(1), None, scale)
                o, state = o + o_rev.flip(1), None
        else:  # one token (decode): the exact recurrent step in PyTorch
            q, g = gates(q_logits, f_logits, lb)
            o, state = hgrn2_recurrent_step(q.view(B, H, K), g.view(B, H, K), v[:, 0], state, scale)
            o = o[:, None]  # [B, 1, H, V]
        # (7) out = RMSNorm(y) W_o   (norm over all D channels, fp32 weight)
        return self.o_proj(self.g_norm(o.reshape(B, T, D))), state


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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
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
        if self.config.bidirectional and (state is not None or return_state):
            raise ValueError("state and return_state need a causal model: with config.bidirectional=True "
                             "every position reads the whole sequence, so no state carries it on")
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
# The language model and the sequence classifier
# ----------------------------------------------------------------------------------------------


class CausalLMOutput(NamedTuple):
    loss: torch.Tensor | None  # scalar fp32, when labels were given
    logits: torch.Tensor | None  # [B, T, vocab]; None with labels when config.fuse_linear_cross_entropy
    state: torch.Tensor | None  # [L, B, H, K, V] fp32, when state was given or return_state=True


class SequenceClassifierOutput(NamedTuple):
    loss: torch.Tensor | None  # scalar fp32, when labels were given
    logits: torch.Tensor  # [B, num_labels]


# torch.export.save must name the output's type to serialize it; a namedtuple needs registering
# (private API, the one the error message asks for; feature-detected).
_register_namedtuple = getattr(torch.utils._pytree, "_register_namedtuple", None)
if _register_namedtuple is not None:
    for _t in (CausalLMOutput, SequenceClassifierOutput):
        _register_namedtuple(_t, serialized_type_name=f"hgrn2mini.model.{_t.__name__}")


class _PretrainedModel(nn.Module):
    """fla's init, input checks and checkpoints (config.json + model.safetensors), shared by the heads."""

    def _init_weights(self, module: nn.Module) -> None:
        # fla's init: normal(0, initializer_range) for every Linear and the embedding (the padding
        # row included, as fla's _init_weights overwrites it); norms ones and lower bounds zeros
        # are set where they are created.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def _check_input_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        check_ids(input_ids, "input_ids", self.config.vocab_size, "vocab_size")
        if attention_mask is not None:
            check_attention_mask(attention_mask, input_ids)

    def save_pretrained(self, directory: str | Path) -> None:
        """Writes config.json + model.safetensors in fla's layout, each atomically."""
        checkpoint.save_pretrained(self, self.config.to_dict(type(self).__name__), directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None):
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


class HGRN2ForCausalLM(_PretrainedModel):
    """HGRN2 language model: logits, loss when labels are given, recurrent state in and out."""

    def __init__(self, config: HGRN2Config):
        super().__init__()
        self.config = config
        self.model = HGRN2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embeddings.weight

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
        self._check_input_ids(input_ids, attention_mask)
        if labels is not None:
            check_ids(labels, "labels", self.config.vocab_size, "vocab_size", ignore=True, shape=input_ids.shape)
        if state is not None:
            want = self.model.state_shape(input_ids.shape[0])
            check_state("state", state, "[L, B, H, K, V]", want, input_ids.device, "input_ids' device ")
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


class HGRN2ForSequenceClassification(_PretrainedModel):
    """HGRN2 encoder with a linear head on the mean of its final hidden states over the positions
    that are not padding, and cross-entropy. Usually with config.bidirectional=True, so every
    position reads the whole sequence; config.num_labels classes."""

    def __init__(self, config: HGRN2Config):
        super().__init__()
        self.config = config
        self.model = HGRN2Model(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)  # transformers' name
        self.apply(self._init_weights)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        """
        Args:
            input_ids: [B, T] integer token ids in [0, vocab_size).
            labels: [B] integer classes in [0, num_labels) or None.
            attention_mask: [B, T], 1 (or True) at tokens, 0 at padding, or None (no padding).
                A padded position leaves every state unchanged in both directions (HGRN2Attention).
        Returns:
            SequenceClassifierOutput(loss fp32 scalar or None, logits [B, num_labels]).
        """
        self._check_input_ids(input_ids, attention_mask)
        if labels is not None:
            check_ids(labels, "labels", self.config.num_labels, "num_labels", shape=input_ids.shape[:1])
        x, _ = self.model(input_ids, attention_mask=attention_mask)  # [B, T, D]
        m = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).float()[:, :, None]
        pooled = (x.float() * m).sum(1) / m.sum(1).clamp(min=1)  # [B, D]: mean over the tokens
        logits = self.score(pooled.to(x.dtype))  # [B, num_labels]
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss, logits)


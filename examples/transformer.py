"""A LLaMA-style Transformer, the softmax-attention baseline of mqar.py and compare_lm.py.

Pre-norm blocks as HGRN2's (RMSNorm, token mixer, RMSNorm, SwiGLU MLP), with causal softmax
attention in place of the recurrence: rotary position embeddings on q and k (RoPE), one SDPA
call (flash attention on CUDA in bf16). At the same width, depth and MLP size it has the same
parameter count as HGRN2 (both mixers have four D x D projections; HGRN2 adds its [L, D]
lower bounds and a [D] output-norm weight per layer), so the two compare at equal size without tuning.

The interface is the subset of `HGRN2ForCausalLM` the examples use: `forward(input_ids,
labels)` with the loss computed as HGRN2's (labels shifted inside, -100 ignored, fp32), and
`.model(input_ids)` giving the final hidden states, `.lm_head` the output projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hgrn2mini.model import HGRN2MLP as MLP  # HGRN2's SwiGLU MLP: it reads hidden_size and intermediate_size


@dataclass
class TransformerConfig:
    vocab_size: int
    hidden_size: int  # D
    num_hidden_layers: int  # L
    num_heads: int  # D / num_heads is the head dim
    intermediate_size: int | None = None  # HGRN2's default when None: 256 * ceil(int(8D/3) / 256)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False  # the output head is the embedding matrix

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"hidden_size ({self.hidden_size}) / num_heads ({self.num_heads}) must be an even "
                             f"integer (RoPE rotates channel pairs)")
        if self.intermediate_size is None:
            self.intermediate_size = 256 * math.ceil(int(self.hidden_size * 4 * 2 / 3) / 256)


def rope_tables(T: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position t times frequency theta^(-2i/head_dim), [T, head_dim / 2] fp32."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(T, device=device, dtype=torch.float32)[:, None] * freqs
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates channel pairs (i, i + head_dim / 2) of x [B, H, T, head_dim] by the position's angle."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        D = config.hidden_size
        self.num_heads, self.theta = config.num_heads, config.rope_theta
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.o_proj = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        H = self.num_heads
        q, k, v = (p(x).view(B, T, H, D // H).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = rope_tables(T, D // H, self.theta, x.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [B, H, T, D / H]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TransformerModel(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Final hidden states [B, T, D] (and no recurrent state, as HGRN2Model's return)."""
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x), None


class Output(NamedTuple):
    loss: torch.Tensor | None
    logits: torch.Tensor


class TransformerForCausalLM(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.model = TransformerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        for m in self.modules():  # the same init as HGRN2's: normal(0, 0.02), norms ones
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=config.initializer_range)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embeddings.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T] (2 dims), got shape {list(input_ids.shape)}")
        x, _ = self.model(input_ids)
        logits = self.lm_head(x)  # [B, T, vocab]
        if labels is None:
            return Output(None, logits)
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts labels[t + 1]
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return Output(loss, logits)

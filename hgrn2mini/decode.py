"""The decode step's pieces below the generation loop: the static buffers, one block at one
token (the model's PyTorch block, or the fused Triton kernels), and the CUDA-graph capture.

The fused block (`fused_block`) runs a layer in five Triton launches (`hgrn2mini.kernels.decode`):
q/f/i projections with attn_norm in front; the gates and the recurrent step; g_norm, o_proj and the
residual; mlp_norm, gate and up with silu(gate) * up; down_proj and the residual. Its activations
stay in three small work buffers made once per batch size; the hidden state x is updated in place.
It runs for models on CUDA whose head dim the kernels take (`fused_unsupported`), and on CPU under
TRITON_INTERPRET=1 (fp32) when asked for (tests); `use_fused` decides.
"""

from __future__ import annotations

from typing import Any

import torch

from hgrn2mini.kernels import decode as kd
from hgrn2mini.kernels.gates import _INTERPRETING

_NOISE_FLOATS = 1 << 24  # noise table rows: at most 64 tokens and 2**24 floats (64 MB) per refill


class _Buffers:
    """Everything one decode step reads and writes, allocated once per batch size."""

    def __init__(self, model, B: int, device: torch.device):
        c = model.config
        z, f32 = dict(device=device), dict(device=device, dtype=torch.float32)
        self.state = torch.zeros(model.model.state_shape(B), **f32)  # [L, B, H, K, V]
        self.tok = torch.zeros(B, dtype=torch.long, **z)  # the last token chosen, fed next
        self.live = torch.zeros(B, dtype=torch.bool, **z)  # tok is the row's (not padding after its eos)
        self.lengths = torch.zeros(B, dtype=torch.long, **z)
        self.lower_bounds = torch.zeros(c.num_hidden_layers, c.hidden_size, **f32) if c.use_lower_bound else None
        self.is_eos = torch.zeros(c.vocab_size, dtype=torch.bool, **z)
        self.pad = torch.zeros((), dtype=torch.long, **z)
        self.temperature = torch.ones((), **f32)
        self.top_p = torch.ones((), **f32)
        self.noise = None  # [rows, B, vocab] Gumbel noise refilled every `rows` tokens, made when first sampled
        self.slot = torch.zeros(1, dtype=torch.long, **z)  # the noise row that the next choice reads
        # The fused block's activations, made when a fused step is first built: q/f/i logits
        # [3, B, D], the recurrence's output [B, D], the MLP's hidden [B, I].
        self.qfi = self.o = self.h = None

    def make_noise(self) -> None:
        if self.noise is None:
            B, vocab = self.tok.shape[0], self.is_eos.shape[0]
            self.noise = self.state.new_zeros(max(1, min(64, _NOISE_FLOATS // (B * vocab))), B, vocab)

    def make_workspace(self, model) -> None:
        if self.qfi is None:
            c, w = model.config, model.model.embeddings.weight
            B = self.tok.shape[0]
            self.qfi = w.new_empty(3, B, c.hidden_size)
            self.o = w.new_empty(B, c.hidden_size)
            self.h = w.new_empty(B, c.intermediate_size)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in vars(self).values() if t is not None]


def _block_step(layer, x: torch.Tensor, lb, state: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """One block at one token, its state [B, H, K, V] updated in place; a row not live keeps it."""
    x, new = layer(x, lb, state, live[:, None])
    state.copy_(new)
    return x


def fused_block(b: _Buffers):
    """`_block_step`'s signature and result for the buffers b, in five Triton launches."""

    def step(layer, x: torch.Tensor, lb, state: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        x2 = x.view(x.shape[0], x.shape[-1])  # [B, D], updated in place by the two residual adds
        a, m = layer.attn, layer.mlp
        n = layer.attn_norm
        kd.norm_matvec(x2, n.weight, n.eps, (a.q_proj.weight, a.f_proj.weight, a.i_proj.weight), b.qfi)
        kd.recurrent_step(b.qfi, lb if a.bounded else None, live, state, b.o, a.head_k_dim**-0.5)
        kd.norm_matvec_add(b.o, a.g_norm.weight, a.g_norm.eps, a.o_proj.weight, x2)
        n = layer.mlp_norm
        kd.norm_glu(x2, n.weight, n.eps, m.gate_proj.weight, m.up_proj.weight, b.h)
        kd.matvec_add(b.h, m.down_proj.weight, x2)
        return x

    return step


def fused_unsupported(model) -> str | None:
    """Why the fused block cannot run this model, or None when it can."""
    c, w = model.config, model.model.embeddings.weight
    K = c.head_k_dim
    if w.device.type != "cuda" and not (_INTERPRETING and w.device.type == "cpu"):
        return f"the model is on {w.device}: the kernels run on CUDA (or on the CPU under TRITON_INTERPRET=1)"
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the model's dtype is {w.dtype}: the kernels take float32, bfloat16 and float16"
    if w.device.type == "cpu" and w.dtype != torch.float32:
        return "Triton's interpreter computes bfloat16 and float16 wrongly: float32 only on the CPU"
    if K & (K - 1) or K > 256 or c.head_v_dim != K:
        return f"head dims K = {K}, V = {c.head_v_dim}: the kernels take K = V, a power of two up to 256"
    if c.bidirectional:
        return "the model is bidirectional: decoding needs a causal one"
    for layer in model.model.layers:
        for lin in (layer.attn.q_proj, layer.attn.f_proj, layer.attn.i_proj, layer.attn.o_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            if lin.weight.dtype != w.dtype or lin.weight.device != w.device or not lin.weight.is_contiguous():
                return "every projection weight must be contiguous, in the embedding's dtype and device"
    return None


def use_fused(model, fused: bool | None, capture: str) -> bool:
    """fused None: the fused block on CUDA when the model is supported and the capture does not
    compile the whole step; True: the fused block, or a ValueError saying why not; False: never."""
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(f"fused must be None, True or False, got {fused!r}")
    if fused is False:
        return False
    why = fused_unsupported(model)
    if fused is None:
        return why is None and capture != "compile" and model.model.embeddings.weight.is_cuda
    if capture == "compile":
        raise ValueError("fused=True launches the Triton decode kernels eagerly or inside a CUDA graph; "
                         "capture='compile' compiles the PyTorch step: use 'none', 'graph' or 'compile+graph'")
    if why is not None:
        raise ValueError(f"fused=True cannot run this model: {why}")
    return True


def _graphed(fn, pool) -> Any:
    """fn captured as a CUDA graph (after three runs on a side stream, which also compile it)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph.replay

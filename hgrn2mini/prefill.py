"""The prompt's forward at bucketed lengths, replayed from a CUDA graph per (batch size, bucket).

Read eagerly, a prompt costs the host a few hundred launches (every layer's norms, projections and
chunk-op kernels), more time than the GPU takes for them at prompt lengths of a few thousand. So on
CUDA `generate` reads it at a bucket length: the prompt left-padded to the next power of two
(`bucket`, from MIN_BUCKET up to MAX_BUCKET), as a batch of prompts of different lengths is. A
padded position has forget gate 1 and key 0, so it leaves the state exactly as it was, and each
position's output depends on the positions up to it only: the padding changes nothing but the
rounding of the chunked sums (each prompt's chunks start elsewhere). A prompt longer than
MAX_BUCKET is read in pieces of MAX_BUCKET, the first one padded, each starting from the state the
previous one left.

Per (batch size, bucket) the forward is captured once (`Prefill`), with the state to start from,
the ids and the mask as static inputs, and replayed for every prompt of that bucket: the host
launches one graph. Under capture "none" the same bucketed forward runs eagerly, so the eager and
the captured generation read the same prompt with the same kernels, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hgrn2mini.decode import _graphed

MIN_BUCKET = 64  # one chunk of the chunk op
MAX_BUCKET = 4096


def bucket(T: int) -> int:
    """The length a prompt of T tokens is read at: the next power of two, at least MIN_BUCKET,
    at most MAX_BUCKET (longer prompts are read in pieces)."""
    return min(MAX_BUCKET, max(MIN_BUCKET, 1 << (T - 1).bit_length()))


class Prefill:
    """The model's forward for B rows at bucket length Tb from static buffers: ids [B, Tb], mask
    [B, Tb] (0 at padding) and `state` [L, B, H, K, V] fp32, the state to start from, which the
    forward overwrites with the state after the prompt (one buffer for every bucket of a batch
    size). Returns the last position's hidden state [B, D] (after the final norm, a static buffer)
    and `state`. captured: as a CUDA graph (`decode._graphed`: warm-up runs on a side stream,
    which also build the Triton kernels), drawing its temporaries from pool; else run eagerly."""

    def __init__(self, model, Tb: int, state: torch.Tensor, captured: bool, pool=None):
        B = state.shape[1]
        self.ids = torch.zeros(B, Tb, dtype=torch.long, device=state.device)
        self.mask = torch.zeros(B, Tb, dtype=torch.bool, device=state.device)
        self.state, self.x = state, None

        def forward() -> None:
            x, new = model.model(self.ids, self.state, return_state=True, attention_mask=self.mask)
            if self.x is None:  # the first run, never a captured one
                self.x = torch.empty_like(x[:, -1])
            self.x.copy_(x[:, -1])
            self.state.copy_(new)  # every layer has read its state by now

        self.run = forward
        if captured:
            start = state.clone()  # the warm-up runs overwrite the buffer a previous piece left
            self.run = _graphed(forward, pool)
            state.copy_(start)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor | None, state: torch.Tensor | None):
        """(last hidden state [B, D], state) of a piece of ids [B, T <= Tb], left-padded to Tb,
        from state (None: zeros)."""
        T, Tb = ids.shape[1], self.ids.shape[1]
        pad = Tb - T
        self.ids[:, :pad].zero_()
        self.ids[:, pad:].copy_(ids)
        self.mask[:, :pad].zero_()
        if mask is None:
            self.mask[:, pad:].fill_(True)
        else:
            self.mask[:, pad:].copy_(mask != 0)
        if state is None:
            self.state.zero_()
        elif state is not self.state:  # a later piece starts from the buffer itself
            self.state.copy_(state)
        self.run()
        return self.x, self.state


def pieces(T: int) -> list[tuple[int, int]]:
    """(start, end) of the pieces a prompt of T tokens is read in: the first of T mod MAX_BUCKET
    tokens (or MAX_BUCKET), then whole MAX_BUCKETs."""
    first = T - MAX_BUCKET * ((T - 1) // MAX_BUCKET)
    return [(0, first)] + [(s, s + MAX_BUCKET) for s in range(first, T, MAX_BUCKET)]


def read_prompt(get: Callable[[int], Prefill], ids: torch.Tensor, mask: torch.Tensor | None,
                state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden state [B, D], state after the prompt) of ids [B, T] through the Prefill that
    get(bucket length) returns, piece by piece (`pieces`)."""
    x = None
    for start, end in pieces(ids.shape[1]):
        x, state = get(bucket(end - start))(ids[:, start:end], mask[:, start:end] if mask is not None else None,
                                            state)
    return x, state

"""Generation: the prompt through the chunk op, then one constant-cost recurrent step per token.

HGRN2's only cache is its state, [L, B, H, K, V] fp32 whatever the length. `generate` reads the
prompt with the model's forward (the chunk op; on CUDA at a bucketed length, replayed from a CUDA
graph, `hgrn2mini.prefill`), then runs `_decode_step` once per new token: the
embedding, every layer's exact recurrent step (`hgrn2_recurrent_step`), the final norm, the head and
the choice of the next token, all on the device and in place on static buffers allocated once per
batch size (`_Buffers`). Nothing in the step allocates on the host or waits for the device, so it
can be captured as a CUDA graph and replayed, one launch a token. `capture` picks how:

    "none"           the eager step (the only choice on the CPU; what CI tests)
    "graph"          the eager step captured with torch.cuda.CUDAGraph (as mamba-ssm's decoding)
    "compile"        torch.compile(step, mode="reduce-overhead", fullgraph=True) (as gpt-fast)
    "compile+graph"  each block and the head compiled (two block graphs for any depth, as
                     `compile_regions`), the whole step captured with torch.cuda.CUDAGraph
    "auto"           "compile+graph" on CUDA, "none" elsewhere

`fused` picks the block inside the step: on CUDA by default each layer runs as five fused Triton
kernels (`hgrn2mini.decode.fused_block`: norms, projections, gates and recurrence, residuals),
launched eagerly or captured in the graph, so "compile+graph" compiles only the head; fused=False
keeps the model's PyTorch block, which "compile" always traces.

Batches of prompts of different lengths are left-padded with an `attention_mask`: a padded
position has forget gate 1, so it leaves the state exactly as it was, and each row generates what
it generates alone. Each row stops on its own at an `eos_token_id`: the row is then finished on the
device, its later tokens are `pad_token_id` and its state stops changing. Whether every row has
finished is read back every CHECK_EVERY tokens without waiting (a copy to pinned memory and an
event polled later), so the loop stops at most about 2 * CHECK_EVERY steps after the last eos and
never stalls the device.

Random draws: sampling is the Gumbel-max race, argmax(logits / temperature + G) over the tokens
top-k / top-p keep, with G = -log(-log U). U comes from a noise table [M, B, vocab] that the caller's
`torch.Generator` fills every M tokens, outside the captured step; the step reads row `slot` of it
and advances `slot` on the device. So the eager, graphed and compiled steps draw the same numbers,
a seeded generator reproduces a run, and no CUDA-graph RNG registration is needed (it differs
between torch releases and torch.compile does not take generator arguments).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import torch

from hgrn2mini import decode, prefill
from hgrn2mini.checks import check_attention_mask
from hgrn2mini.decode import _block_step, _Buffers, _graphed
from hgrn2mini.model import HGRN2ForCausalLM
from hgrn2mini.ops import check_state

CAPTURES = ("auto", "none", "graph", "compile", "compile+graph")
# Every CHECK_EVERY tokens the loop asks (without waiting) whether any row is still running: rare
# enough to cost nothing, often enough to stop soon after the last eos.
CHECK_EVERY = 16


class GenerationOutput(NamedTuple):
    tokens: torch.Tensor  # [B, N] int64 new tokens, N = max(lengths); a row's tokens past its length are padding
    lengths: torch.Tensor  # [B] int64: new tokens of each row, its eos included
    state: torch.Tensor  # [L, B, H, K, V] fp32: after the prompt and each row's `lengths` new tokens


@dataclasses.dataclass(frozen=True)
class _Sampling:  # what a captured step specializes on; temperature and top_p's value are device tensors
    greedy: bool
    top_k: int | None
    top_p: bool


def _allowed_logits(logits, temperature, top_k: int | None, top_p) -> torch.Tensor:
    """logits [B, vocab] / temperature in fp32, -inf where top-k / top-p drop a token."""
    x = logits.float() / temperature
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None:
        sorted_x, order = x.sort(-1, descending=True)
        p = sorted_x.softmax(-1)
        # Drop a token when the tokens before it already hold top_p of the mass; the first always stays.
        drop_sorted = (p.cumsum(-1) - p) >= top_p
        x = x.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return x


def _gumbel(uniform: torch.Tensor) -> torch.Tensor:
    """G = -log(-log U) in place, U kept inside (0, 1) so that G is finite: -inf + G stays -inf."""
    return uniform.clamp_(1e-30, 1 - 2**-24).log_().neg_().log_().neg_()


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Draws one token per row from logits [B, vocab] -> [B], without leaving the device.
    temperature 0 is greedy; top_k keeps the k largest, top_p the smallest head of the sorted
    distribution holding top_p of the mass."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    x = _allowed_logits(logits, temperature, top_k, top_p if top_p is not None and top_p < 1 else None)
    g = _gumbel(torch.rand(x.shape, generator=generator, device=x.device))
    return (x + g).argmax(-1)


def _choose(logits: torch.Tensor, b: _Buffers, spec: _Sampling) -> torch.Tensor:
    """The next token of every row [B] from logits [B, vocab]; advances the noise slot."""
    if spec.greedy:
        return logits.argmax(-1)
    x = _allowed_logits(logits, b.temperature, spec.top_k, b.top_p if spec.top_p else None)
    g = b.noise.index_select(0, b.slot)[0]  # [B, vocab]
    b.slot.copy_((b.slot + 1) % b.noise.shape[0])
    return (x + g).argmax(-1)


def _head_step(model: HGRN2ForCausalLM, x: torch.Tensor, b: _Buffers, spec: _Sampling) -> None:
    """Final norm, head, the next token, and each row's end: a row that fed an eos (or had
    finished) stops, and from then on its tokens are padding."""
    token = _choose(model.lm_head(model.model.norm(x[:, 0])), b, spec)
    stopped = ~b.live | b.is_eos[b.tok]
    b.tok.copy_(torch.where(stopped, b.pad, token))
    b.live.copy_(~stopped)
    b.lengths.add_(b.live)


def _decode_step(model: HGRN2ForCausalLM, b: _Buffers, spec: _Sampling, block=_block_step, head=_head_step) -> None:
    """Feeds b.tok to every layer (rows not live leave their state alone) and chooses the next."""
    x = model.model.embeddings(b.tok)[:, None]  # [B, 1, D]
    for i, layer in enumerate(model.model.layers):
        x = block(layer, x, b.lower_bounds[i] if b.lower_bounds is not None else None, b.state[i], b.live)
    head(model, x, b, spec)


def _bucketed(ids: torch.Tensor) -> bool:
    """Whether the prompt is read at bucketed lengths (`hgrn2mini.prefill`): on CUDA."""
    return ids.is_cuda


class _Decoder:
    """A model's decode buffers and steps, kept between calls (as an attribute of the model). They
    are dropped when the model's parameters move (`.to`, a new dtype): the graphs read the
    parameters' memory. Copying or pickling the model starts an empty one."""

    def __init__(self):
        self.key, self.buffers, self.steps, self.pool = (), {}, {}, None  # steps[B, _Sampling, capture]
        self.owner = {}  # B -> weakref of the Generation using buffers[B]
        self.prefills, self.prefill_states, self.prefill_pool = {}, {}, None  # [B, bucket, captured]; [B]

    def __deepcopy__(self, memo):
        return _Decoder()

    def __reduce__(self):
        return _Decoder, ()

    @staticmethod
    def of(model: HGRN2ForCausalLM) -> _Decoder:
        d = model.__dict__.setdefault("_decoder", _Decoder())
        p = next(model.parameters())
        key = (p.device, p.dtype, tuple(q.data_ptr() for q in model.parameters()))
        if key != d.key:
            d.__init__()
            d.key = key
        return d

    def prefill(self, model: HGRN2ForCausalLM, B: int, Tb: int, capture: str) -> prefill.Prefill:
        """The prompt's forward at batch size B and bucket length Tb (`hgrn2mini.prefill`),
        captured at its first use unless capture is "none"."""
        captured = capture != "none"
        if (B, Tb, captured) not in self.prefills:
            if B not in self.prefill_states:  # one buffer for every bucket of a batch size
                self.prefill_states[B] = torch.zeros(model.model.state_shape(B), device=self.key[0])
            self.prefill_pool = self.prefill_pool or (torch.cuda.graph_pool_handle() if captured else None)
            self.prefills[B, Tb, captured] = prefill.Prefill(model, Tb, self.prefill_states[B], captured,
                                                             self.prefill_pool)
        return self.prefills[B, Tb, captured]

    def step(self, model: HGRN2ForCausalLM, B: int, spec: _Sampling, capture: str, fused: bool = False):
        """The step for batch size B: captured (and compiled) at its first use, before the buffers
        get their real contents (the warm-up runs write them). fused: each block in the fused Triton
        kernels (`hgrn2mini.decode.fused_block`), launched eagerly or captured, never compiled."""
        if B not in self.buffers:
            self.buffers[B] = _Buffers(model, B, next(model.parameters()).device)
        b = self.buffers[B]
        if not spec.greedy:
            b.make_noise()
        if (B, spec, capture, fused) in self.steps:
            return b, self.steps[B, spec, capture, fused]
        block = _block_step
        if fused:
            b.make_workspace(model)
            block = decode.fused_block(b)
        eager = lambda: _decode_step(model, b, spec, block)  # noqa: E731
        if capture == "none":
            fn = eager
        elif capture == "compile":
            for t in b.tensors():  # in-place updates of these stay inside cudagraph trees' graph
                torch._dynamo.mark_static_address(t)
            compiled = torch.compile(_decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
            fn = lambda: compiled(model, b, spec)  # noqa: E731
            for _ in range(3):  # compile, record, replay once
                fn()
        else:  # "graph", "compile+graph"
            if capture == "compile+graph":
                if not fused:
                    block = torch.compile(_block_step, fullgraph=True, dynamic=False)
                head = torch.compile(_head_step, fullgraph=True, dynamic=False)
                eager = lambda: _decode_step(model, b, spec, block, head)  # noqa: E731
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            fn = _graphed(eager, self.pool)
        self.steps[B, spec, capture, fused] = fn
        return b, fn


class Generation(Iterator):
    """One generation, run as it is iterated. Each step gives that step's tokens [B] (int64, on the
    model's device, a view into `result().tokens`); a finished row gives pad_token_id. The prompt
    is read at the first step. `result()` runs what is left and returns a GenerationOutput."""

    def __init__(self, model, ids, n, mask, state, spec, temperature, top_p, generator, eos, pad, capture, fused):
        self._model, self._ids, self._n, self._mask, self._state0, self._spec = model, ids, n, mask, state, spec
        self._temperature, self._top_p, self._generator = temperature, top_p, generator
        self._eos, self._pad, self._capture, self._fused = eos, pad, capture, fused
        self._i = self._draws = 0  # tokens given so far; noise rows used (the device's slot, unasked)
        self._out: GenerationOutput | None = None
        self._b = self._pending = None  # buffers; (pinned flag "a row is live", event) of the last check

    def __next__(self) -> torch.Tensor:
        with torch.no_grad():
            if self._b is None:
                self._start()
            if self._out is None and self._decoder.owner[self._ids.shape[0]]() is not self:
                raise RuntimeError("another generation at this batch size started on this model and took its "
                                   "decode buffers: this one cannot continue (finish one before starting another)")
            if self._out is not None or self._i >= self._n or self._all_finished():
                self._finish()
                raise StopIteration
            if self._i > 0:
                self._refill()
                self._step()
            self.tokens_buffer[:, self._i].copy_(self._b.tok)
            self._i += 1
            return self.tokens_buffer[:, self._i - 1]

    def result(self) -> GenerationOutput:
        for _ in self:
            pass
        with torch.no_grad():
            self._finish()
        n = int(self._out.lengths.max()) if self._out.lengths.numel() else 0
        return self._out._replace(tokens=self._out.tokens[:, :n])

    def _start(self) -> None:
        model, ids = self._model, self._ids
        B = ids.shape[0]
        self._decoder = _Decoder.of(model)
        b, self._step = self._decoder.step(model, B, self._spec, self._capture, self._fused)
        self._b, self._decoder.owner[B] = b, weakref.ref(self)
        self.tokens_buffer = torch.full((B, self._n), self._pad, dtype=torch.long, device=ids.device)
        b.is_eos.zero_()
        if self._eos:
            b.is_eos[torch.tensor(self._eos, device=ids.device)] = True
        b.pad.fill_(self._pad)
        b.temperature.fill_(self._temperature or 1.0)
        b.top_p.fill_(self._top_p if self._top_p is not None else 1.0)
        b.slot.zero_()
        if b.lower_bounds is not None:  # lb = cumsum(softmax(P over layers)) - S[0], as the model's forward
            S = model.model.lower_bounds.softmax(0, dtype=torch.float32)
            b.lower_bounds.copy_(S.cumsum(0) - S[0])
        if _bucketed(ids):  # at bucketed lengths, one graph a piece (hgrn2mini.prefill)
            x, state = prefill.read_prompt(lambda Tb: self._decoder.prefill(model, B, Tb, self._capture), ids,
                                           self._mask, self._state0)
        else:
            x, state = model.model(ids, self._state0, return_state=True, attention_mask=self._mask)
            x = x[:, -1]
        b.state.copy_(state)
        b.lengths.zero_()
        if self._n > 0:
            self._refill()
            b.tok.copy_(_choose(model.lm_head(x), b, self._spec))
            b.live.fill_(True)
            b.lengths.fill_(1)

    def _refill(self) -> None:
        if not self._spec.greedy:  # the device's slot is self._draws % rows: a new table at 0
            if self._draws % self._b.noise.shape[0] == 0:
                _gumbel(self._b.noise.uniform_(generator=self._generator))
            self._draws += 1

    def _all_finished(self) -> bool:
        """Every CHECK_EVERY tokens: the answer to the previous question, if it has arrived, and a
        new question (live.any() copied to pinned memory, an event behind it). Never waits."""
        if not self._eos or self._i % CHECK_EVERY:
            return False
        live = self._b.live
        if live.device.type != "cuda":
            return not bool(live.any())
        done = False
        if self._pending is not None and self._pending[1].query():
            done = not bool(self._pending[0])
        if not done:
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(live.any(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (flag, event)
        return done

    def _finish(self) -> None:
        """Feeds the last token (the state holds every token returned: a row stopped by max_new_tokens
        has one to read), then copies the outputs out of the buffers, which later calls reuse."""
        if self._out is not None:
            return
        b = self._b
        lengths = b.lengths.clone()
        if 0 < self._n == self._i:
            self._refill()
            self._step()
        self._out = GenerationOutput(self.tokens_buffer, lengths, b.state.clone())


def _check_sampling(temperature, top_k, top_p) -> None:
    if not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


def _token_ids(name: str, value: Any, vocab_size: int, single: bool = False) -> list[int]:
    ids = [value] if single or not isinstance(value, Iterable) else list(value)
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise ValueError(f"{name} must be token ids in [0, vocab_size={vocab_size}), got {value!r}")
    return ids


def generate(
    model: HGRN2ForCausalLM, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None, *,
    attention_mask: torch.Tensor | None = None, eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int | None = None, state: torch.Tensor | None = None, capture: str = "auto",
    fused: bool | None = None,
) -> Generation:
    """Generates up to max_new_tokens tokens after each row of input_ids.

    Args:
        input_ids: [B, T] token ids; rows of different lengths are left-padded (any id) and marked
            by attention_mask.
        max_new_tokens: int >= 0.
        temperature: 0 is greedy (argmax); > 0 samples from softmax(logits / temperature).
        top_k, top_p: keep the k most likely tokens / the most likely ones holding top_p of the mass.
        generator: a torch.Generator on the model's device for the random draws (default: torch's).
        attention_mask: [B, T] 0/1 or bool, left-padded (each row 0...0 1...1, ending in 1), or None.
        eos_token_id: one id or several, or None (never stop early); a row stops after its eos.
        pad_token_id: the token a finished row gives; default config.pad_token_id, else the first
            eos, else 0.
        state: [L, B, H, K, V] fp32 to start from: a GenerationOutput's state continues that
            conversation (it holds every token returned), None starts from zeros.
        capture: how the decode step runs, one of CAPTURES (module docstring).
        fused: each block of the decode step in five fused Triton kernels (`hgrn2mini.decode`):
            None picks them on CUDA where the model's shapes allow and capture is not "compile";
            True insists (a ValueError says why it cannot), also on the CPU under
            TRITON_INTERPRET=1; False keeps the PyTorch block.
    Returns:
        A Generation: iterate it to stream [B] tokens a step, or call `.result()` for
        GenerationOutput(tokens [B, N], lengths [B], state).
    """
    if not isinstance(model, HGRN2ForCausalLM):
        raise TypeError(f"model must be an HGRN2ForCausalLM, got {type(model).__name__}")
    model._check_input_ids(input_ids)
    c, device, B = model.config, next(model.parameters()).device, input_ids.shape[0]
    if input_ids.device != device:
        raise ValueError(f"input_ids must be on the model's device {device}, got {input_ids.device}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    _check_sampling(temperature, top_k, top_p)
    if generator is not None and getattr(generator, "device", None) not in (device, torch.device(device.type)):
        raise ValueError(f"generator must be a torch.Generator on the model's device {device}, got {generator!r}")
    if attention_mask is not None:
        check_attention_mask(attention_mask, input_ids)
        m = attention_mask != 0
        if (m[:, :-1] & ~m[:, 1:]).any() or not m[:, -1].all():
            raise ValueError("attention_mask must be left-padded: each row 0...0 1...1 with at least one 1 "
                             "(a 0 after a 1, or a row ending in 0, found)")
    eos = _token_ids("eos_token_id", eos_token_id, c.vocab_size) if eos_token_id is not None else []
    if pad_token_id is None:
        pad_token_id = c.pad_token_id if c.pad_token_id is not None else (eos[0] if eos else 0)
    pad = _token_ids("pad_token_id", pad_token_id, c.vocab_size, single=True)
    if state is not None:
        if isinstance(state, torch.Tensor) and state.dim() == 5 and state.shape[1] != B:
            raise ValueError(f"state must have input_ids' batch size {B} in dim 1 ([L, B, H, K, V]), "
                             f"got {list(state.shape)}")
        check_state("state", state, "[L, B, H, K, V]", model.model.state_shape(B), device, "the model's device ")
    if capture not in CAPTURES:
        raise ValueError(f"capture must be one of {CAPTURES}, got {capture!r}")
    if capture == "auto":
        capture = "compile+graph" if device.type == "cuda" else "none"
    if capture in ("graph", "compile+graph") and device.type != "cuda":
        raise ValueError(f"capture={capture!r} needs the model on CUDA, got {device}; use 'none' or 'auto'")
    fused = decode.use_fused(model, fused, capture)
    spec = _Sampling(True, None, False) if temperature == 0 else _Sampling(False, top_k, (top_p or 1) < 1)
    return Generation(model, input_ids, max_new_tokens, attention_mask, state, spec, temperature, top_p,
                      generator, eos, pad[0], capture, fused)


def warmup(model: HGRN2ForCausalLM, batch_sizes: Iterable[int] = (1,), max_prompt_len: int = 2048,
           prompt_lengths: Iterable[int] | None = None, padded: bool = True, **kwargs: Any) -> None:
    """Runs a 2-token generation at every batch size and prompt length, so that later calls at
    these batch sizes compile nothing: the decode step is captured (and compiled) once per batch
    size and sampling kind (pass the temperature / top_k / top_p / capture of the real calls in
    kwargs), and the prompt's forward is built. On CUDA a prompt is read at a bucket length
    (`hgrn2mini.prefill.bucket`), so prompt_lengths None takes one length per bucket up to
    max_prompt_len's. Elsewhere the prefill's kernels vary with the length T by the launch plan (a
    function of the number of 64-token chunks and B * H) and by T % 16 == 0, on which Triton
    specializes integers: prompt_lengths None then takes `kernels.chunk.prefill_lengths`, one
    length per plan and residue, and with padded each length also runs with an attention mask.
    Prompts are token 0."""
    from hgrn2mini.kernels.chunk import prefill_lengths

    c, device = model.config, next(model.parameters()).device
    for B in batch_sizes:
        if prompt_lengths is not None:
            lengths = prompt_lengths
        elif device.type == "cuda":
            lengths = sorted({prefill.bucket(T) for T in range(1, min(max_prompt_len, prefill.MAX_BUCKET) + 1)})
            padded = False  # the bucketed forward always reads a mask
        else:
            lengths = prefill_lengths(B, c.num_heads, c.head_k_dim, c.head_v_dim, max_prompt_len, device)
        for T in lengths:
            ids = torch.zeros(B, T, dtype=torch.long, device=device)
            for mask in [None, torch.ones_like(ids)] if padded else [None]:
                generate(model, ids, 2, attention_mask=mask, **kwargs).result()


def compile_counts() -> dict[str, int]:
    """Graphs torch.compile has built in this process, and Triton kernels compiled for
    hgrn2mini's ops (their JIT caches): equal counts before and after a call mean it compiled
    nothing."""
    from torch._dynamo.utils import counters

    kernels = 0
    for name in [m for m in list(sys.modules) if m.startswith("hgrn2mini.kernels.")]:
        for fn in vars(sys.modules[name]).values():
            jit = fn if hasattr(fn, "device_caches") else getattr(fn, "fn", None)  # an autotuner wraps one
            with contextlib.suppress(AttributeError, TypeError, IndexError):
                kernels += sum(len(c[0]) for c in jit.device_caches.values())
    return {"dynamo_graphs": int(counters["stats"]["unique_graphs"]), "triton_kernels": kernels}

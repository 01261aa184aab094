"""The chunked HGRN2 recurrence on the GPU: the Triton kernels put together in the order of the
algorithm (reference.py derives it; kernels/DESIGN.md says what each kernel reads and writes).

    forward:  state walk (state.py)  ->  in-chunk pass and output (out.py)
    backward: [state walk again, unless the forward's states are kept]
              ->  reverse state walk  ->  dv (out.py, transposed)  ->  dq, dg (dqg.py)

The PyTorch reference (`chunk_hgrn2_fwd_ref`, `chunk_hgrn2_bwd_ref`), the op's path wherever
`triton_supported` is False, is re-exported here with the launch settings.
"""

from __future__ import annotations

import torch
from hgrn2mini.kernels.dqg import _run_dqg
from hgrn2mini.kernels.launch import launcher
from hgrn2mini.kernels.out import _run_out
from hgrn2mini.kernels.reference import CHUNK, chunk_hgrn2_bwd_ref, chunk_hgrn2_fwd_ref
from hgrn2mini.kernels.settings import _BT, CONFIG, FAST, triton_supported
from hgrn2mini.kernels.state import _run_states, walk_plan

__all__ = ["CHUNK", "CONFIG", "FAST", "chunk_hgrn2_bwd", "chunk_hgrn2_bwd_ref", "chunk_hgrn2_fwd",
           "chunk_hgrn2_fwd_ref", "chunk_hgrn2_fwd_with_states", "launcher", "prefill_lengths", "triton_supported"]


def chunk_hgrn2_fwd_with_states(q, g, v, initial_state, scale):
    """Triton forward. q, g [B, T, H, K] (g fp32), v [B, T, H, V]; returns o, the final state
    (fp32) and the chunk-start states [B*H, NT, K, V] (q's dtype), which the backward can take
    instead of walking the sequence again."""
    q, g, v = q.contiguous(), g.contiguous(), v.contiguous()
    h0 = initial_state.contiguous() if initial_state is not None else None
    # 1. Chunk-start states (a segmented walk's are joined by the out kernel as it reads them).
    states, hT, join = _run_states(q, g, v, h0, False, scale, join_later=True)
    # 2. Each chunk's output from its start state and its in-chunk pairs.
    return _run_out(q, g, v, states, scale, False, join), hT, states


def chunk_hgrn2_fwd(q, g, v, initial_state, scale):
    """Triton forward: o and the final state (fp32)."""
    o, hT, _ = chunk_hgrn2_fwd_with_states(q, g, v, initial_state, scale)
    return o, hT


def chunk_hgrn2_bwd(q, g, v, initial_state, do, dht, scale, states=None, logits=None):
    """Triton backward: (dq, dg fp32, dv, d initial state fp32). states: the forward's chunk-start
    states, or None to compute them again.

    logits: (q_logits, f_logits [B, T, H, K] in q's dtype, lower_bound [H*K] fp32 or None) where q
    and g are HGRN2's gates of these (`hgrn2mini.kernels.gates`): then the dq/dg kernel carries the
    gradients on through the gates (`gates_bwd`) and this returns (d q_logits, d f_logits, d
    lower_bound or None, dv, d initial state); dq and dg are never written to memory."""
    # Gradients can arrive with stride 0 (the gradient of `.sum()`); the kernels index densely.
    q, g, v, do = q.contiguous(), g.contiguous(), v.contiguous(), do.contiguous()
    h0 = initial_state.contiguous() if initial_state is not None else None
    # 1. The forward's chunk-start states, walked again where they were not kept.
    if states is None:
        states, _, _ = _run_states(q, g, v, h0, False, scale)
    # 2. The chunk-end state gradients, walking back from the final state's gradient.
    dht = dht.contiguous() if dht is not None else None
    dstates, dh0, join = _run_states(q, g, do, dht, True, scale, join_later=True)
    # 3. dv, the out kernel transposed; it also stores b = cumsum(g) per chunk for step 4.
    gcum = torch.empty_like(g)
    dv = _run_out(q, g, do, dstates, scale, True, join, gcum=gcum)
    # 4. dq and dg (or the logits' gradients) from the states, their gradients and the pairs.
    if logits is not None:
        dq_logits, df_logits, dlb = _run_dqg(q, g, gcum, v, do, states, dstates, scale, logits)
        return dq_logits, df_logits, dlb, dv, dh0
    dq, dg = _run_dqg(q, g, gcum, v, do, states, dstates, scale)
    return dq, dg, dv, dh0


def prefill_lengths(batch: int, heads: int, K: int, V: int, max_len: int, device=None) -> list[int]:
    """Sequence lengths up to max_len that between them build every kernel variant the forward
    launches at this batch size and head count, so that a warm-up over them leaves nothing to
    compile for any later length up to max_len (T > 1). What varies with T: the state walk's plan
    (`walk_plan`: segments, tile side, pairing) and the out kernel's REDO (`_redo_chunks`), both
    functions of the number of 64-step chunks; and Triton's specialization of integer arguments
    on divisibility by 16. One length per distinct plan with T % 16 == 0 and one without."""
    from hgrn2mini.kernels.launch import _redo_chunks

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    BVO = min(V, CONFIG["out_bv"])
    seen, lengths = set(), []
    for NT in range(1, -(-max_len // _BT) + 1):
        plan = (walk_plan(batch * heads, NT, K, V), _redo_chunks((V // BVO, NT, batch * heads), dev))
        if plan in seen:
            continue
        seen.add(plan)
        hi, lo = min(NT * _BT, max_len), max(2, (NT - 1) * _BT + 1)
        lengths += [T for T in (hi - hi % 16, hi if hi % 16 else hi - 1) if T >= lo]
    return sorted(set(lengths))

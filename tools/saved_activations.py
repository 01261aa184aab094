"""What the compiled training step keeps for the backward, listed without a GPU.

    python benchmarks/saved_activations.py [layers] [B] [T] [--json]   (default 2 layers, 8 x 2048)

The 374M model (fewer layers) is built on the meta device and traced by torch.compile with
Inductor's decompositions and partitioner, but its forward graph is only captured, never run.
The op takes its Triton path as on CUDA (`triton_supported` forced; a stand-in Triton driver
reports an sm_90 target so that Inductor's analysis of which kernel arguments are written works
as on the GPU). Prints every tensor the forward graph hands to the backward, with its bytes:
parameters first, then activations layer by layer. On 2026-11-24 this showed each layer saving q
after silu, g (fp32) and logaddexp's fp32 intermediate; the model now recomputes them.
"""

import functools
import json
import sys

import torch
import triton
from functorch.compile import min_cut_rematerialization_partition
from hgrn2mini.kernels import chunk
from offline_regs import Sm90Driver  # this folder: the script's own
from torch._dynamo.backends.common import aot_autograd
from torch._inductor.decomposition import select_decomp_table

from hgrn2mini import HGRN2Config, HGRN2ForCausalLM


class _Captured(Exception):
    pass


def saved_tensors(layers: int, B: int, T: int):
    """(is_parameter, name, dtype, shape, bytes) of each tensor the forward graph saves. Replaces
    Triton's driver and the op's path choice for the whole process: run it in a process of its own."""
    triton.runtime.driver.set_active(Sm90Driver())
    chunk.triton_supported = lambda q, v: True
    graphs = []

    def fw(gm, _):
        graphs.append(gm)
        raise _Captured

    partition = functools.partial(min_cut_rematerialization_partition, compiler="inductor")
    backend = aot_autograd(fw_compiler=fw, bw_compiler=fw, decompositions=select_decomp_table(),
                           partition_fn=partition)
    cfg = HGRN2Config.from_preset("374M", vocab_size=32000, num_hidden_layers=layers)
    with torch.device("meta"):
        model = HGRN2ForCausalLM(cfg).to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="meta")
    try:
        torch.compile(model, backend=backend, fullgraph=True)(ids, labels=ids)
    except Exception:  # the capture ends the trace on purpose
        if not graphs:
            raise
    out = next(n for n in graphs[0].graph.nodes if n.op == "output")
    rows = []
    for a in out.args[0]:
        val = getattr(a, "meta", {}).get("val")
        if isinstance(val, torch.Tensor):
            rows.append((a.op == "placeholder", a.name, val.dtype, list(val.shape), val.numel() * val.element_size()))
    return rows


if __name__ == "__main__":
    args = [int(x) for x in sys.argv[1:4] if x.isdigit()]
    layers, B, T = args + [2, 8, 2048][len(args):]
    rows = saved_tensors(layers, B, T)
    if "--json" in sys.argv:  # for tests/test_model.py, which runs this in a process of its own
        print(json.dumps([[p, n, str(d), s, b] for p, n, d, s, b in rows]))
        sys.exit(0)
    for is_param, name, dtype, shape, nbytes in rows:
        print(f"{nbytes / 1e6:9.1f} MB  {'param' if is_param else 'act  '}  {str(dtype):15s} {shape} {name}")
    acts = sum(r[4] for r in rows if not r[0])
    print(f"activations saved: {acts / 1e9:.2f} GB for {layers} layers at B={B}, T={T}")

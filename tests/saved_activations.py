"""What the compiled training step keeps for the backward, listed without a GPU.

    python tests/saved_activations.py [layers] [B] [T] [--json] [--out DIR]   (default 2 layers, 8 x 2048)

The 374M model (fewer layers) is built on the meta device and traced by torch.compile with
Inductor's decompositions and partitioner, but its forward graph is only captured, never run.
The op takes its Triton path as on CUDA (`triton_supported` forced; a stand-in Triton driver
reports an sm_90 target so that Inductor's analysis of which kernel arguments are written works
as on the GPU). Prints every tensor the forward graph hands to the backward, with its bytes:
parameters first, then activations layer by layer (with --json, one JSON list instead). With --out
the JSON list is also written to DIR/saved_activations.json.
"""

import argparse
import functools
import json
import os
import sys

import torch
import triton
from functorch.compile import min_cut_rematerialization_partition
from hgrn2mini.kernels import chunk
from torch._dynamo.backends.common import aot_autograd
from torch._inductor.decomposition import select_decomp_table

from hgrn2mini import HGRN2Config, HGRN2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run with python -P too
from offline import Sm90Driver  # noqa: E402


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("layers", type=int, nargs="?", default=2, help="layers of the 374M model kept")
    p.add_argument("B", type=int, nargs="?", default=8, help="batch size")
    p.add_argument("T", type=int, nargs="?", default=2048, help="sequence length")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    p.add_argument("--out", default=None, help="folder for saved_activations.json (none: print only)")
    args = p.parse_args()
    rows = saved_tensors(args.layers, args.B, args.T)
    records = [[is_param, name, str(dtype), shape, nbytes] for is_param, name, dtype, shape, nbytes in rows]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "saved_activations.json"), "w") as fh:
            json.dump(records, fh)
    if args.json:
        print(json.dumps(records))
        return
    for is_param, name, dtype, shape, nbytes in rows:
        print(f"{nbytes / 1e6:9.1f} MB  {'param' if is_param else 'act  '}  {str(dtype):15s} {shape} {name}")
    acts = sum(r[4] for r in rows if not r[0])
    print(f"activations saved: {acts / 1e9:.2f} GB for {args.layers} layers at B={args.B}, T={args.T}")


if __name__ == "__main__":
    main()

"""Registers and stack (spill) bytes per thread of the Triton kernels, compiled for sm_90 on a
machine without a GPU (Triton ships ptxas and cuobjdump): a proxy for register pressure without a
GPU. The pointers are typed 16-byte aligned, as a launch specializes them (compiled unaligned, every
global load becomes 2-byte scalar loads and the counts are not the launched kernel's). Triton 3.6
and 3.9 give somewhat different counts.

    python tools/offline_regs.py [state] [out] [dqg] [--gated] [--out DIR]  (K = V = 128, bf16)

--gated: the dq/dg kernel carrying the gradients through the gates (GATES, with a lower bound).
What is printed is also written to DIR/offline_regs.txt with --out. The checks of the kernels'
contract with torch.compile (compiling as Inductor types the arguments, the written-argument
analysis) are in tests/offline.py.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton.backends.nvidia
from hgrn2mini.kernels import dqg, out, state

# The kernels' argument types and the sm_90 compile: the offline checks' own (tests/offline.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from offline import ARGS, DT, GATED, GATED_ARGS, PLAIN, PREC, K, V, compile_sm90  # noqa: E402

FAMILIES = ["state", "out", "dqg"]
BIN = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin")


def usage(fn, types: dict, consts: dict, warps: int, stages: int = 1) -> str:
    """Registers and stack bytes of fn compiled for sm_90, pointers 16-byte aligned (as a launch on
    torch's tensors specializes them: unaligned, every global load is a 2-byte scalar load)."""
    kernel = compile_sm90(fn, types, consts, warps, stages, aligned=True)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    return f"regs {m.group(1)}, stack {m.group(2)} B"


def counts(what: set, gated: bool):
    """Prints the register and stack counts of each kernel family in `what` at K = V = 128, bf16."""
    gates = GATED if gated else PLAIN
    ptrs = {**(GATED_ARGS if gates["GATES"] else ARGS), "scale": "fp32"}
    if "state" in what:
        for BS, warps, stages, rev, seg, pair in [(64, 4, 3, False, False, True), (64, 4, 3, True, False, True),
                                                  (64, 4, 3, False, False, False), (32, 4, 3, False, False, True),
                                                  (64, 4, 3, False, True, True), (64, 4, 3, True, True, True)]:
            c = dict(K=K, V=V, BT=64, BS=BS, DT=DT, PREC=PREC, REVERSE=rev, HAS_H0=True, SEGMENTED=seg, PAIR=pair)
            print("state", dict(BS=BS, warps=warps, stages=stages, reverse=rev, segmented=seg, pair=pair),
                  usage(state._state_kernel, ptrs, c, warps, stages), flush=True)
        for rev in (False, True):
            print("segment", usage(state._segment_kernel, ptrs, dict(K=K, V=V, BS=64, REVERSE=rev), 4), flush=True)
        print("fixup", usage(state._fixup_kernel, ptrs, dict(K=K, V=V, BT=64, BS=64), 4), flush=True)
    if "out" in what:
        for BK, BVO, warps, general, join in [(128, 128, 4, False, False), (128, 128, 4, False, True),
                                              (64, 128, 8, False, False), (64, 128, 4, False, False),
                                              (32, 128, 8, False, False), (64, 128, 8, True, False)]:
            c = dict(K=K, V=V, BT=64, BC=16, BK=BK, BVO=BVO, DT=DT, PREC=PREC, FAST_RANGE=60.0, DV=False,
                     GENERAL=general, FLAGGED=general, JOIN=join, JR=32, REDO=1, STORE_GCUM=False)
            print("out", dict(BK=BK, BVO=BVO, warps=warps, general=general, join=join),
                  usage(out._out_kernel, ptrs, c, warps), flush=True)
    if "dqg" in what:
        for BK, warps, general in [(64, 8, False), (32, 4, False), (32, 8, False), (16, 4, False), (64, 8, True)]:
            c = dict(K=K, V=V, BT=64, BC=16, BK=BK, BV=BK, DT=DT, PREC=PREC, PREC32="tf32", FAST_RANGE=60.0,
                     GENERAL=general, FLAGGED=general, REDO=1, **gates)
            print("dqg", dict(BK=BK, warps=warps, general=general), usage(dqg._dqg_kernel, ptrs, c, warps), flush=True)


class _Tee:
    """stdout that also writes to a file."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)

    def flush(self):
        for s in self.streams:
            s.flush()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", nargs="*", help=f"kernel families to count, of {FAMILIES} (none: all)")
    p.add_argument("--gated", action="store_true", help="the dq/dg kernel with the gradients through the gates")
    p.add_argument("--out", default=None, help="folder for offline_regs.txt (none: print only)")
    args = p.parse_args()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        sys.stdout = _Tee(sys.stdout, open(os.path.join(args.out, "offline_regs.txt"), "w"))  # noqa: SIM115
    unknown = set(args.what) - set(FAMILIES)
    if unknown:
        p.error(f"kernel families must be among {FAMILIES}, got {sorted(unknown)}")
    counts(set(args.what or FAMILIES), args.gated)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

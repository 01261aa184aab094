"""Registers and stack (spill) bytes per thread of the Triton kernels, compiled for sm_90 on a
machine without a GPU (Triton ships ptxas and cuobjdump). A proxy for register pressure between
device sessions: the device's Triton may allocate differently (on 2026-11-24, Triton 3.9 here
reported stack frames where the H100's Triton 3.6 reported no spills for the same state kernel).

    python benchmarks/offline_regs.py [state] [out] [dqg]     (K = V = 128, bf16)
    python benchmarks/offline_regs.py --check K V              (exit status: every variant compiles)

--check compiles every variant the op launches of the kernels that take `scale`, with `scale`
typed as Inductor passes it (an fp64 scalar, or a constexpr where it specializes): a kernel that
redefines an argument with another type inside a branch compiles under eager launches (fp32) and
fails under torch.compile.
"""

import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.backends.nvidia
import triton.language as tl
from hgrn2mini.kernels import chunk as C
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin")
K = V = 128
DT, PREC = tl.bfloat16, "tf32"
# Argument types of every kernel but `scale` (fp32 from an eager launch, fp64 or a constexpr from
# Inductor).
ARGS = dict(q="*bf16", g="*fp32", v="*bf16", do="*bf16", states="*bf16", dstates="*bf16", o="*bf16",
            dq="*bf16", dg="*fp32", h0="*fp32", hT="*fp32", T="i32", H="i32", NSEG="i32", decay="*fp32",
            seg_decay="*fp32", seg_end="*fp32", h_in="*fp32", flags="*i8")


def usage(fn, types: dict, consts: dict, warps: int, stages: int = 1) -> str:
    sig = {p: ("constexpr" if p in consts else types[p]) for p in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=consts), target=TARGET,
                            options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    return f"regs {m.group(1)}, stack {m.group(2)} B"


def check(K: int, V: int) -> int:
    """Compiles each variant of the kernels that take `scale` for sm_90 with scale as fp64 and as a
    constexpr; prints one line per variant, returns the number that failed."""
    common = dict(K=K, V=V, BT=64, DT=DT, PREC=PREC)
    variants = [(C._state_kernel, dict(BS=min(K, V, 64), REVERSE=rev, HAS_H0=True, SEGMENTED=seg))
                for rev in (False, True) for seg in (False, True)]
    modes = [dict(GENERAL=False, FLAGGED=False), dict(GENERAL=True, FLAGGED=True), dict(GENERAL=True, FLAGGED=False)]
    # The out kernel joins a segmented walk's states in its first (or only) launch, never in the second.
    variants += [(C._out_kernel, dict(BC=16, BK=min(K, 64), BVO=V, FAST_RANGE=60.0, DV=dv, JOIN=join, JR=min(K, 32),
                                      **m))
                 for dv in (False, True) for m in modes for join in (False, True) if not (join and m["FLAGGED"])]
    variants += [(C._dqg_kernel, dict(BC=16, BK=min(K, 32), BV=min(V, K, 32), PREC32="tf32", FAST_RANGE=60.0, **m))
                 for m in modes]
    failed = 0
    for fn, consts in variants:
        for scale in ("fp64", "constexpr"):
            c = {**common, **consts}
            c = {k: c[k] for k in fn.arg_names if k in c}
            if scale == "constexpr":
                c["scale"] = 0.25
            try:
                usage(fn, {**ARGS, "scale": "fp64"}, c, 4)
                ok = "ok"
            except Exception as e:  # noqa: BLE001 - reported, counted
                failed += 1
                ok = "FAILED " + str(e).splitlines()[-1][:300]
            flags = ("REVERSE", "SEGMENTED", "DV", "GENERAL", "FLAGGED", "JOIN")
            print(fn.__name__, {k: v for k, v in consts.items() if k in flags}, "scale", scale, ok, flush=True)
    return failed


def main():
    what = set(sys.argv[1:]) or {"state", "out", "dqg"}
    ptrs = {**ARGS, "scale": "fp32"}
    if "state" in what:
        for BS, warps, stages, rev, seg in [(64, 4, 3, False, False), (64, 4, 3, True, False), (32, 4, 3, False, False),
                                            (64, 4, 3, False, True), (64, 4, 3, True, True)]:
            c = dict(K=K, V=V, BT=64, BS=BS, DT=DT, PREC=PREC, REVERSE=rev, HAS_H0=True, SEGMENTED=seg)
            print("state", dict(BS=BS, warps=warps, stages=stages, reverse=rev, segmented=seg),
                  usage(C._state_kernel, ptrs, c, warps, stages), flush=True)
        for rev in (False, True):
            print("segment", usage(C._segment_kernel, ptrs, dict(K=K, V=V, BS=64, REVERSE=rev), 4), flush=True)
        print("fixup", usage(C._fixup_kernel, ptrs, dict(K=K, V=V, BT=64, BS=64), 4), flush=True)
    if "out" in what:
        for BK, BVO, warps, general, join in [(128, 128, 4, False, False), (128, 128, 4, False, True),
                                              (64, 128, 8, False, False), (64, 128, 4, False, False),
                                              (32, 128, 8, False, False), (64, 128, 8, True, False)]:
            c = dict(K=K, V=V, BT=64, BC=16, BK=BK, BVO=BVO, DT=DT, PREC=PREC, FAST_RANGE=60.0, DV=False,
                     GENERAL=general, FLAGGED=general, JOIN=join, JR=32)
            print("out", dict(BK=BK, BVO=BVO, warps=warps, general=general, join=join),
                  usage(C._out_kernel, ptrs, c, warps), flush=True)
    if "dqg" in what:
        for BK, warps, general in [(64, 8, False), (32, 4, False), (32, 8, False), (16, 4, False), (64, 8, True)]:
            c = dict(K=K, V=V, BT=64, BC=16, BK=BK, BV=BK, DT=DT, PREC=PREC, PREC32="tf32", FAST_RANGE=60.0,
                     GENERAL=general, FLAGGED=general)
            print("dqg", dict(BK=BK, warps=warps, general=general), usage(C._dqg_kernel, ptrs, c, warps),
                  flush=True)

if __name__ == "__main__":
    if "--check" in sys.argv:
        i = sys.argv.index("--check")
        sys.exit(1 if check(int(sys.argv[i + 1]), int(sys.argv[i + 2])) else 0)
    main()

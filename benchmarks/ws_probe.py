"""Whether this Triton compiles warp specialization for sm_90 (Hopper) without a GPU: a loop of
TMA tensor-descriptor loads feeding tl.dot, under tl.range(warp_specialize=True), compiled
offline; prints whether the TTGIR holds a ttg.warp_specialize region. A probe for a kernel whose
programs stream chunks, loads in one warp group and math in another (benchmarks/RESULTS.md,
eleventh session), not a kernel of the op. At run time, device-side descriptors also need
triton.set_allocator.

Then whether a Gluon kernel (hand-written partitions, the alternative) runs under
TRITON_INTERPRET=1, where CI runs the op's kernels: a store kernel in a subprocess.

    python benchmarks/ws_probe.py
"""

import os
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit
def _probe(a, b, c, N, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr, SCAN: tl.constexpr):
    pid = tl.program_id(0)
    da = tl.make_tensor_descriptor(a, shape=[N, N], strides=[N, 1], block_shape=[BM, BK])
    db = tl.make_tensor_descriptor(b, shape=[N, N], strides=[N, 1], block_shape=[BK, BN])
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for kk in tl.range(0, N // BK, warp_specialize=WS, num_stages=2):
        x = da.load([pid * BM, kk * BK])
        if SCAN:  # as the op's kernels do with g: a scan over the tile's rows and exponentials first
            x = tl.exp(tl.cumsum(x.to(tl.float32), 0)).to(tl.bfloat16)
        acc = tl.dot(x, db.load([kk * BK, 0]), acc)
    tl.store(c + (pid * BM + tl.arange(0, BM))[:, None] * BN + tl.arange(0, BN)[None, :], acc)


def main():
    sig = {
        "a": "*bf16",
        "b": "*bf16",
        "c": "*fp32",
        "N": "i32",
        "BM": "constexpr",
        "BN": "constexpr",
        "BK": "constexpr",
        "WS": "constexpr",
        "SCAN": "constexpr",
    }
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(4)}
    for ws, scan in ((False, False), (True, False), (True, True)):
        src = ASTSource(_probe, sig, constexprs={"BM": 64, "BN": 64, "BK": 64, "WS": ws, "SCAN": scan}, attrs=aligned)
        try:
            ttgir = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ttgir"]
            print(
                f"Triton {triton.__version__}, warp_specialize={ws}, scan={scan}: compiled, "
                f"ttg.warp_specialize regions: {ttgir.count('ttg.warp_specialize')}"
            )
        except Exception as e:  # noqa: BLE001 - the probe's answer
            why = str(e).splitlines()[-1][:200]
            print(f"Triton {triton.__version__}, warp_specialize={ws}, scan={scan}: failed: {why}")


GLUON = """
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

@gluon.jit
def twice(x, y, N: gl.constexpr):
    offs = gl.arange(0, N, layout=gl.BlockedLayout([1], [32], [1], [0]))
    gl.store(y + offs, gl.load(x + offs) * 2)

x = torch.arange(32, dtype=torch.float32)
y = torch.empty_like(x)
twice[(1,)](x, y, 32, num_warps=1)
print("ran:", bool((y == 2 * x).all()))
"""


def gluon_interpreted():
    with tempfile.TemporaryDirectory() as tmp:  # @jit needs its source in a file
        path = os.path.join(tmp, "gluon_probe.py")
        with open(path, "w") as fh:
            fh.write(GLUON)
        run = subprocess.run(
            [sys.executable, path],
            env={**os.environ, "TRITON_INTERPRET": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
    lines = (run.stdout + run.stderr).strip().splitlines()
    print(
        f"Triton {triton.__version__}, a Gluon kernel under TRITON_INTERPRET=1: "
        f"{'exit 0' if run.returncode == 0 else 'failed'}: {lines[-1][:200] if lines else ''}"
    )


if __name__ == "__main__":
    main()
    gluon_interpreted()

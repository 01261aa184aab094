"""How far the dq/dg kernel is from its own loads (device machine, K = V = 128, B 8, T 2048, H 8).

    python benchmarks/dqg_floor.py

Stand-in kernels on the dq/dg kernel's grid and tiles (64 keys, 64 values, 8 warps) load what it
loads and store what it stores: with no arithmetic, with its three value-loop matmuls (dA, do h^T,
v dh^T), and with two row sums on top, one down and one up the chunk, either as tl.cumsum or as
matmuls with a 0/1 triangle (x split into three bf16 parts). Each is timed against the kernel
itself (do_bench medians, the middle of five rounds), and the two ways of summing are compared.
The outputs are not gradients: only the time means anything."""
import torch
import triton
import triton.language as tl
from hgrn2mini.kernels import chunk as C
from hgrn2mini.kernels.chunk import _head, _load_tile, _store_tile
from triton.testing import do_bench


@triton.jit
def _tri(M, x):
    x1 = x.to(tl.bfloat16)
    r = x - x1.to(tl.float32)
    x2 = r.to(tl.bfloat16)
    x3 = (r - x2.to(tl.float32)).to(tl.bfloat16)
    acc = tl.dot(M, x3)
    acc = tl.dot(M, x2, acc)
    return tl.dot(M, x1, acc)


@triton.jit
def floor(q, g, v, do, states, dstates, dq, dg, T, H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
          BK: tl.constexpr, BV: tl.constexpr, DOTS: tl.constexpr, CUMSUM: tl.constexpr):
    ik, n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NT = tl.cdiv(T, BT)
    t0, rows, ck = n * BT, tl.arange(0, BT), ik * BK + tl.arange(0, BK)
    offk, offv = _head(bh, T, H, K, V)
    chunk = (bh * NT + n) * K * V  # this chunk's state and state gradient
    st, dst = states + chunk, dstates + chunk
    a = tl.zeros([BT, BK], dtype=tl.float32)
    b = tl.zeros([BT, BK], dtype=tl.float32)
    dA = tl.zeros([BT, BT], dtype=tl.float32)
    outside = tl.zeros([BK], dtype=tl.float32)
    for iv in range(0, V // BV):
        cv = iv * BV + tl.arange(0, BV)
        vc = _load_tile(v + offv, t0, T, H * V, rows, cv)
        doc = _load_tile(do + offv, t0, T, H * V, rows, cv)
        h = tl.load(st + ck[:, None] * V + cv[None, :])
        dh = tl.load(dst + ck[:, None] * V + cv[None, :])
        if DOTS:
            dA += tl.dot(doc, tl.trans(vc))
            a += tl.dot(doc, tl.trans(h))
            b += tl.dot(vc, tl.trans(dh))
            outside += tl.sum(h.to(tl.float32) * dh.to(tl.float32), 1)
        else:
            a += doc.to(tl.float32) + h.to(tl.float32)
            b += vc.to(tl.float32) + dh.to(tl.float32)
    qt = _load_tile(q + offk, t0, T, H * K, rows, ck).to(tl.float32)
    gc = _load_tile(g + offk, t0, T, H * K, rows, ck)
    if CUMSUM == 1:
        gc = tl.cumsum(gc, 0) + tl.cumsum(a * gc, 0, reverse=True)
    elif CUMSUM == 2:  # the same sums as matmuls with 0/1 triangles, x split into three bf16 parts
        low = (rows[:, None] >= rows[None, :]).to(tl.bfloat16)
        up = (rows[:, None] <= rows[None, :]).to(tl.bfloat16)
        gc = _tri(low, gc) + _tri(up, a * gc)
    _store_tile(dq + offk, a + qt + tl.sum(dA, 1)[:, None], t0, T, H * K, rows, ck)
    _store_tile(dg + offk, b + gc + outside[None, :], t0, T, H * K, rows, ck)


def main():
    B, T, H, K = 8, 2048, 8, 128
    V = K
    NT = T // 64
    bf = dict(device="cuda", dtype=torch.bfloat16)
    q, v, do = (torch.randn(B, T, H, K, **bf) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device="cuda"))
    states, dstates = (torch.randn(B * H, NT, K, V, **bf) * 0.1 for _ in range(2))
    dq, dg = torch.empty_like(q), torch.empty_like(g)
    grid = (K // 64, NT, B * H)
    flags = torch.empty(grid[0] * grid[1] * grid[2], device="cuda", dtype=torch.int8)
    lbp = torch.empty(0, H * K, device="cuda")
    def stand_in(dots, cumsum):
        return lambda: floor[grid](q, g, v, do, states, dstates, dq, dg, T, H, K=K, V=V, BT=64, BK=64, BV=64,
                                   DOTS=dots, CUMSUM=cumsum, num_warps=8)

    runs = {
        "loads only": stand_in(False, 0),
        "loads + 3 matmuls": stand_in(True, 0),
        "loads + 3 matmuls + 2 cumsums": stand_in(True, 1),
        "loads + 3 matmuls + 2 triangle matmul sums": stand_in(True, 2),
        "dq/dg kernel": lambda: C._dqg_kernel[grid](
            # scanning g itself (LOAD_GCUM off; g stands in for gcum, never read): the two scans and the
            # loads the stand-ins have, not the dv kernel's stored b, which they do not load
            q, g, g, v, do, states, dstates, dq, dg, T, H, K**-0.5, flags, q_logits=q, f_logits=q, lb=q,
            dlb_part=lbp, K=K, V=V, BT=64, BC=16, BK=64, BV=64, DT=tl.bfloat16, PREC="tf32", PREC32="tf32",
            FAST_RANGE=60.0, GENERAL=False, FLAGGED=False, GATES=False, HAS_LB=False, LOAD_GCUM=False, REDO=1,
            num_warps=8, num_stages=1),
    }
    nbytes = (q.numel() * 2 + g.numel() * 4 + 2 * (v.numel() * 2 + do.numel() * 2) + states.numel() * 4
              + q.numel() * 2 + g.numel() * 4)
    times = {k: [] for k in runs}
    for f in runs.values():
        f()
    for _ in range(5):
        for k, f in runs.items():
            times[k].append(do_bench(f, warmup=10, rep=100, return_mode="median"))
    outs = []
    for key in ("loads + 3 matmuls + 2 cumsums", "loads + 3 matmuls + 2 triangle matmul sums"):
        runs[key]()
        outs.append(dg.clone())
    d = (outs[0] - outs[1]).abs().max() / outs[0].abs().max()
    print(f"triangle sums against tl.cumsum: max |diff| / max |x| {d.item():.2e}")
    for k, t in times.items():
        t = sorted(t)[2]
        print(f"{k:32s} {t:.4f} ms  ({nbytes / t / 1e9:.2f} TB/s over {nbytes / 1e6:.0f} MB, v and do counted twice)")


if __name__ == "__main__":
    main()

"""A/B: gates by Inductor + the plain kernels (A) against the fused gated kernels (B), fwd+bwd,
CUDA graphs, interleaved rounds, medians. K = V = 128, bf16, lb in (0, 0.5)."""
import statistics, sys, torch
from triton.testing import do_bench
from hgrn2mini.kernels import chunk as C
from hgrn2mini.kernels.gates import gates, gates_bwd, gates_triton
C._launch = lambda k: k
cg, cgb = torch.compile(gates), torch.compile(gates_bwd)

def A(y, x, lb, v, do, s, heads):
    q, g = cg(y, x, lb)
    o, _, st = C.chunk_hgrn2_fwd_with_states(q.view(heads), g.view(heads), v, None, s)
    dq, dg, dv, _ = C.chunk_hgrn2_bwd(q.view(heads), g.view(heads), v, None, do, None, s, st)
    q, g = cg(y, x, lb)  # the backward recomputes the gates
    return (o,) + tuple(cgb(y, x, lb, g, dq.view(y.shape), dg.view(y.shape))) + (dv,)

def B(y, x, lb, v, do, s, heads):
    q, g = gates_triton(y, x, lb, C._launch)
    o, _, st = C.chunk_hgrn2_fwd_with_states(q.view(heads), g.view(heads), v, None, s)
    q, g = gates_triton(y, x, lb, C._launch)
    dy, dx, dlb, dv, _ = C.chunk_hgrn2_bwd(q.view(heads), g.view(heads), v, None, do, None, s, st, (y.view(heads), x.view(heads), lb))
    return o, dy.view(y.shape), dx.view(y.shape), dlb, dv

def AF(y, x, lb, v, do, s, heads):
    q, g = cg(y, x, lb)
    return C.chunk_hgrn2_fwd_with_states(q.view(heads), g.view(heads), v, None, s)[0]

def BF(y, x, lb, v, do, s, heads):
    q, g = gates_triton(y, x, lb, C._launch)
    return C.chunk_hgrn2_fwd_with_states(q.view(heads), g.view(heads), v, None, s)[0]

for shape in sys.argv[1].split(","):
    Bn, T, H = (int(t) for t in shape.split("x")); K = 128
    torch.manual_seed(0)
    y = torch.randn(Bn, T, H * K, device="cuda", dtype=torch.bfloat16)
    x = (torch.randn(Bn, T, H * K, device="cuda") + 2).bfloat16()
    lb = torch.rand(H * K, device="cuda") * 0.5
    v = torch.randn(Bn, T, H, K, device="cuda", dtype=torch.bfloat16); do = torch.randn_like(v)
    args = (y, x, lb, v, do, K ** -0.5, (Bn, T, H, K))
    outs = {n: f(*args) for n, f in (("A", A), ("B", B))}
    errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(outs["A"], outs["B"])]
    graphs = {}
    for n, f in (("A", A), ("B", B), ("AF", AF), ("BF", BF)):
        for _ in range(2): f(*args)
        torch.cuda.synchronize(); gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr): f(*args)
        graphs[n] = gr
    ts = {n: [] for n in graphs}
    for r in range(7):
        for n, gr in graphs.items(): ts[n].append(do_bench(gr.replay, warmup=25, rep=100))
    med = {n: statistics.median(t) for n, t in ts.items()}
    print(f"{shape}: fwd+bwd A {med['A']:.3f} B {med['B']:.3f} ms (B/A {statistics.median([b/a for a,b in zip(ts['A'],ts['B'])]):.3f}); "
          f"fwd A {med['AF']:.3f} B {med['BF']:.3f}; rel diff o,dy,dx,dlb,dv {[f'{e:.1e}' for e in errs]}", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for n in ("A", "B"):
            for _ in range(5): graphs[n].replay()
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14), flush=True)

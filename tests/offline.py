"""The Triton kernels' contract with torch.compile, checked offline for sm_90 on a machine without
a GPU (Triton ships ptxas). Run as a program by tests/test_kernels.py, in a process of its own
(the tests' process runs Triton's interpreter):

    python tests/offline.py --check K V    (exit status: every variant compiles)
    python tests/offline.py --writes       (exit status: no input reported written)
    python tests/offline.py --decode-pdl   (exit status: the decode kernels compile with PDL)

--check compiles every variant the op launches of the kernels that take `scale` (the chunk
kernels at K, V; the K = V = 1 scan's, whatever K, V), with `scale`
typed as Inductor passes it (an fp64 scalar, or a constexpr where it specializes): a kernel that
redefines an argument with another type inside a branch compiles under eager launches (fp32) and
fails under torch.compile.

--writes runs the gated op's kernels (the gates' kernel, forward, backward) through torch's
analysis of which arguments a user kernel writes, which Inductor trusts under torch.compile (a
kernel reported as writing an input gets wrong results compiled, right ones eagerly:
kernels/gates.py), and prints each kernel's reported writes.
"""

import argparse

import triton
import triton.language as tl
from hgrn2mini.kernels import chunk as C
from hgrn2mini.kernels import dqg, launch, out, scan1, state
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)


class Sm90Driver:
    """A stand-in for Triton's driver on a machine without a GPU: only what torch's analysis of
    user kernels (and Inductor's, saved_activations.py) asks of it."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def is_active(self):
        return True

K = V = 128
DT, PREC = tl.bfloat16, "tf32"
# Argument types of every kernel but `scale` (fp32 from an eager launch, fp64 or a constexpr from
# Inductor).
ARGS = dict(q="*bf16", g="*fp32", gcum="*fp32", v="*bf16", do="*bf16", states="*bf16", dstates="*bf16", o="*bf16",
            dq="*bf16", dg="*fp32", h0="*fp32", hT="*fp32", T="i32", H="i32", NSEG="i32", decay="*fp32",
            seg_decay="*fp32", seg_end="*fp32", h_in="*fp32", flags="*i8", lb="*fp32", dlb_part="*fp32",
            q_logits="*bf16", f_logits="*bf16")
# GATES (dq/dg kernel): dq and dg are the gradients of the logits (bf16).
GATED_ARGS = {**ARGS, "dg": "*bf16"}
GATED = dict(GATES=True, HAS_LB=True)
PLAIN = dict(GATES=False, HAS_LB=False)
# The K = V = 1 scan's arguments (its states are fp32; f is g = log f plain, the logits gated).
SCAN1_ARGS = dict(q="*bf16", f="*fp32", lb="*fp32", v="*bf16", h0="*fp32", y="*bf16", states="*fp32", hT="*fp32",
                  dy="*bf16", dht="*fp32", dq="*bf16", df="*fp32", dv="*bf16", dh0="*fp32", dlb_part="*fp32",
                  B="i32", T="i32", H="i32")


def compile_sm90(fn, types: dict, consts: dict, warps: int, stages: int = 1, aligned: bool = True):
    """fn compiled for sm_90 with these argument types and constexprs. Switches left out take their
    defaults, as a launch that does not name them does. aligned: pointers typed 16-byte aligned, as
    a launch on tensors from torch's allocator specializes them."""
    consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **consts}
    sig = {p: ("constexpr" if p in consts else types[p]) for p in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.arg_names) if aligned and sig[p].startswith("*")}
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=TARGET,
                          options={"num_warps": warps, "num_stages": stages})


def check(K: int, V: int) -> int:
    """Compiles each variant of the kernels that take `scale` for sm_90 with scale as fp64 and as a
    constexpr; prints one line per variant, returns the number that failed."""
    common = dict(K=K, V=V, BT=64, DT=DT, PREC=PREC)
    variants = [(state._state_kernel, dict(BS=min(K, V, 64), REVERSE=rev, HAS_H0=True, SEGMENTED=seg, PAIR=pair))
                for rev in (False, True) for seg in (False, True) for pair in (False, True)]
    modes = [dict(GENERAL=False, FLAGGED=False, REDO=1), dict(GENERAL=True, FLAGGED=True, REDO=4),
             dict(GENERAL=True, FLAGGED=False, REDO=1)]
    # The out kernel joins a segmented walk's states, and stores gcum (dv), in its first (or only)
    # launch, never in the second.
    variants += [(out._out_kernel, dict(BC=16, BK=min(K, 64), BVO=V, FAST_RANGE=60.0, DV=dv, JOIN=join, JR=min(K, 32),
                                      STORE_GCUM=dv and not m["FLAGGED"], **m))
                 for dv in (False, True) for m in modes for join in (False, True) if not (join and m["FLAGGED"])]
    variants += [(dqg._dqg_kernel, dict(BC=16, BK=min(K, 32), BV=min(V, K, 32), PREC32="tf32", FAST_RANGE=60.0, **m))
                 for m in modes]
    # Each variant both ways of typing scale; the dq/dg kernel with GATES too (scale as fp64: how
    # a variant types scale does not depend on GATES).
    variants = [(fn, {**consts, **(PLAIN if fn is dqg._dqg_kernel else {})}, scale) for fn, consts in variants
                for scale in ("fp64", "constexpr")] + [
        (fn, {**consts, **GATED}, "fp64") for fn, consts in variants if fn is dqg._dqg_kernel]
    # The K = V = 1 scan, forward and backward: plain, gated, gated with a lower bound; every
    # optional input given (the variants that read the most).
    scan = [dict(GATED=g, HAS_LB=lb, HAS_H0=True, BB=1, BD=64) for g, lb in ((False, False), (True, False), (True, True))]
    variants += [(fn, {**c, **({"HAS_DHT": True} if fn is scan1._bwd_kernel else {})}, sc)
                 for fn in (scan1._fwd_kernel, scan1._bwd_kernel) for c in scan for sc in ("fp64", "constexpr")]
    failed = 0
    for fn, consts, scale in variants:
        c = {**common, **consts}
        c = {k: c[k] for k in fn.arg_names if k in c}
        if scale == "constexpr":
            c["scale"] = 0.25
        try:
            types = SCAN1_ARGS if fn in (scan1._fwd_kernel, scan1._bwd_kernel) else \
                GATED_ARGS if consts.get("GATES") else ARGS
            if consts.get("GATED"):
                types = {**types, "f": "*bf16", "df": "*bf16"}
            compile_sm90(fn, {**types, "scale": "fp64"}, c, 4, aligned=False)
            ok = "ok"
        except Exception as e:  # noqa: BLE001 - reported, counted
            failed += 1
            ok = "FAILED " + str(e).splitlines()[-1][:300]
        flags = ("REVERSE", "SEGMENTED", "PAIR", "DV", "GENERAL", "FLAGGED", "JOIN", "GATES", "STORE_GCUM", "GATED",
                 "HAS_LB")
        print(fn.__name__, {k: v for k, v in consts.items() if k in flags}, "scale", scale, ok, flush=True)
    return failed


# What each kernel may write; anything else reported written is an input (or a wrong report).
OUTPUTS = {"_state_kernel": {"states", "hT", "decay", "seg_decay"}, "_segment_kernel": {"h_in", "hT"},
           "_fixup_kernel": {"states"}, "_out_kernel": {"o", "flags", "states", "gcum"},
           "_dqg_kernel": {"dq", "dg", "flags", "dlb_part"}, "_gates_kernel": {"q", "g"},
           "_fwd_kernel": {"y", "states", "hT"}, "_bwd_kernel": {"dq", "df", "dv", "dh0", "dlb_part"}}


def writes() -> int:
    """Runs the gated op's Triton path (forward and backward, segmented walks, both launch modes,
    with and without a lower bound), and the K = V = 1 scan's, on CPU tensors with an sm_90 stand-in driver; every launch goes
    to torch's write analysis instead of the GPU. Returns the number of launches with a reported
    write outside OUTPUTS."""
    import torch
    from hgrn2mini.kernels.gates import gates_triton
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    triton.runtime.driver.set_active(Sm90Driver())
    seen = {}

    def record(kernel):
        def grid(_):
            def call(*args, **kw):
                kwargs = dict(zip(kernel.arg_names, args))
                kwargs.update({k: v for k, v in kw.items() if k in kernel.arg_names})
                if hasattr(tkw, "identify_accessed_tensors"):  # torch 2.13
                    names = [d.name for d in tkw.identify_accessed_tensors(kernel, kwargs, {}).read_writes.writes]
                else:  # earlier torch (2.11 on the device machine): the same analysis, by its older name
                    names = tkw.identify_mutated_tensors(kernel, kwargs, {})
                w = {n for n in names if isinstance(kwargs.get(n), torch.Tensor)}
                consts = tuple(sorted((k, v) for k, v in kw.items() if isinstance(v, bool)))
                seen[(kernel.fn.__name__, consts)] = w
            return call
        return type("Launcher", (), {"__getitem__": lambda self, g: grid(g)})()

    launch.launcher = record
    B, T, H, K, V = 1, 300, 2, 32, 32
    for lb in (None, torch.rand(H * K)):
        for two_pass, seg in ((True, False), (False, True)):
            C.CONFIG.update(two_pass_min_dim=16 if two_pass else 10**9, min_segment_chunks=1,
                            min_programs=10**6 if seg else 1)
            y, x = torch.randn(B, T, H * K), torch.randn(B, T, H * K)
            v, do, h0 = torch.randn(B, T, H, V), torch.randn(B, T, H, V), torch.randn(B, H, K, V)
            q, g = gates_triton(y, x, lb, record)
            q, g = torch.randn(B, T, H, K), -torch.rand(B, T, H, K)  # stand-ins: nothing ran
            _, _, states = C.chunk_hgrn2_fwd_with_states(q, g, v, h0, 0.3)
            heads = (B, T, H, K)
            C.chunk_hgrn2_bwd(q, g, v, h0, do, h0, 0.3, None, (y.view(heads), x.view(heads), lb))
    # The K = V = 1 scan (HGRN1's heads), plain and gated, with and without a lower bound: its kernels
    # on these CPU tensors as on the GPU (scan1._triton says where they run).
    scan1.launcher, scan1._triton = record, lambda *tensors: True
    H1 = 5
    for gated, lb in ((False, None), (True, None), (True, torch.rand(H1))):
        f = torch.randn(B, T, H1) if gated else -torch.rand(B, T, H1, 1)
        q, v, h0 = torch.randn(B, T, H1, *(() if gated else (1,))), torch.randn(B, T, H1, 1), torch.randn(B, H1, 1, 1)
        states = torch.randn(B, T, H1)
        scan1.forward(q, f, lb, v, h0, 0.3, gated)
        scan1.backward(q, f, lb, v, h0, states, torch.randn(B, T, H1, 1), torch.randn(B, H1, 1, 1), 0.3, gated)
    bad = 0
    for (name, consts), w in sorted(seen.items()):
        extra = w - OUTPUTS[name]
        bad += bool(extra)
        print(name, dict(consts), "writes", sorted(w), f"INPUTS REPORTED WRITTEN: {sorted(extra)}" if extra else "ok")
    return bad


def decode_pdl() -> int:
    """Compiles the fused decode kernels (kernels/decode.py) for sm_90 with programmatic dependent
    launch, each launch setting of the 374M shapes' regimes and split-K variants of the matvec
    kernels: each must wait (griddepcontrol.wait) after loading its first weight slice (the
    recurrent step: its state tile), before anything else. A split-K variant must also order its
    partials before its counter: a barrier (bar.sync) between its last global store and the one
    atomic, acq_rel at GPU scope, after the wait, and read partials only after it, through L2
    (ld.global.cg). Prints one line per variant, returns the number that failed."""
    from hgrn2mini.kernels import decode as kd

    mv = dict(x="*bf16", nw="*bf16", w0="*bf16", w1="*bf16", w2="*bf16", res="*bf16", out="*bf16", ws="*fp32",
              cnt="*i32", B="i32", N="i32", Kd="i32", eps="fp32")
    kinds = {"qfi": dict(NUM_W=3, NORM=2, GLU=False, RESIDUAL=False),
             "o": dict(NUM_W=1, NORM=2, GLU=False, RESIDUAL=True),
             "glu": dict(NUM_W=1, NORM=2, GLU=True, RESIDUAL=False),
             "down": dict(NUM_W=1, NORM=0, GLU=False, RESIDUAL=True)}
    # The shipped settings, then split-K: o_proj and down_proj as the sweep's likely picks, q/f/i
    # and gate/up at their shipped tiles split in two.
    splits = {"b1": {"qfi": dict(SPLIT_K=2), "o": dict(BLOCK_N=8, BLOCK_K=256, SPLIT_K=4),
                     "glu": dict(SPLIT_K=2), "down": dict(BLOCK_K=512, SPLIT_K=4)},
              "dot": {"qfi": dict(SPLIT_K=2), "o": dict(BLOCK_N=16, BLOCK_K=128, SPLIT_K=8, num_stages=2),
                      "glu": dict(SPLIT_K=2), "down": dict(BLOCK_N=16, BLOCK_K=256, SPLIT_K=4, num_stages=2)}}
    variants = []
    for split in (False, True):
        for regime in ("b1", "small", "dot"):
            for name, consts in kinds.items():
                if split and regime == "small":
                    continue
                s = {**kd.LAUNCH[name][regime], **(splits[regime][name] if split else {})}
                warps, stages = s.pop("num_warps"), s.pop("num_stages", 1)
                label = f"{name} {regime}" + (f" SPLIT_K={s['SPLIT_K']}" if split else "")
                variants.append((label, kd._matvec_kernel, mv, {**consts, "DOT": regime == "dot",
                                 "DOT_PREC": "tf32", "PDL": True, **s}, warps, stages))
    rec = dict(qfi="*bf16", lb="*fp32", live="*u8", state="*fp32", o="*bf16", B="i32", D="i32", H="i32",
               K="i32", V="i32", scale="fp32")
    variants.append(("recurrent", kd._recurrent_kernel, rec, dict(HAS_LB=True, PDL=True, BLOCK_K=128, BLOCK_V=16),
                     4, 1))
    failed = 0
    for label, fn, types, consts, warps, stages in variants:
        try:
            lines = compile_sm90(fn, types, consts, warps, stages).asm["ptx"].splitlines()
            ok = _pdl_order(lines)
            if ok == "ok" and consts.get("SPLIT_K", 1) > 1:
                ok = _split_order(lines)
        except Exception as e:  # noqa: BLE001 - reported, counted
            ok = "FAILED " + str(e).splitlines()[-1][:300]
        failed += not ok.startswith("ok")
        print(label, "PDL", ok, flush=True)
    return failed


def _pdl_order(lines: list) -> str:
    """"ok" where the PTX waits once, after a global load."""
    wait = [i for i, line in enumerate(lines) if "griddepcontrol.wait" in line]
    loads = [i for i, line in enumerate(lines) if "ld.global" in line]
    return "ok" if len(wait) == 1 and loads and loads[0] < wait[0] else f"FAILED wait {wait}, first load {loads[:1]}"


def _split_order(lines: list) -> str:
    """"ok" where the PTX's one atomic is acq_rel at GPU scope, after the wait, with a barrier
    between it and the global store before it, and every ld.global.cg after it."""
    find = lambda s: [i for i, line in enumerate(lines) if s in line]  # noqa: E731
    atom, wait, cg = find("atom."), find("griddepcontrol.wait"), find("ld.global.cg")
    if len(atom) != 1 or ".acq_rel" not in lines[atom[0]] or ".gpu" not in lines[atom[0]] or atom[0] < wait[0]:
        return f"FAILED atomics {[lines[i].strip() for i in atom]}"
    stores = [i for i in find("st.global") if i < atom[0]]
    if not stores or not any(stores[-1] < i < atom[0] for i in find("bar.sync")):
        return "FAILED no barrier between the partials' stores and the atomic"
    if not cg or cg[0] < atom[0]:
        return f"FAILED partials read at {cg[:1]}, the atomic at {atom[0]}"
    return "ok, split-K ordered"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--check", nargs=2, type=int, metavar=("K", "V"), default=None,
                   help="compile every variant taking `scale` as Inductor types it, at these K, V")
    p.add_argument("--writes", action="store_true", help="check torch's analysis of the arguments each kernel writes")
    p.add_argument("--decode-pdl", action="store_true",
                   help="compile the decode kernels with PDL, a load before the wait")
    args = p.parse_args()
    if args.decode_pdl:
        return 1 if decode_pdl() else 0
    if args.writes:
        return 1 if writes() else 0
    if args.check:
        return 1 if check(*args.check) else 0
    p.error("give --check K V, --writes or --decode-pdl")


if __name__ == "__main__":
    raise SystemExit(main())

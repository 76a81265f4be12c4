#!/usr/bin/env python
"""Variants of our Triton block-sparse kernel on the radial mask: correctness and speed in one run (issue 11, item 3).

Each variant is a set of :class:`~sparse_attn.kernels.block_sparse.KernelConfig` (forward, dK/dV, dQ, or one
single-pass backward with atomic dQ) run through the launchers of ``sparse_attn/kernels/block_sparse.py`` on the
exact radial mask of Wan2.1 81 x 1560 (126,464 tokens, H=12, D=128, bf16; plus 41 x 1560 without ``--quick``),
q/k/v stored ``[B, N, H, D]`` and passed as ``[B, H, N, D]`` views as in ``benchmarks/attention.py``.  Per variant:

* correctness: output and dq/dk/dv against the default configs' at the benchmark shape (relative Frobenius error
  and max |diff| over max |reference|), and against an fp64 dense masked reference at a small shape (2 heads,
  2,048 tokens, a random mask with an empty query-block row), where the same compiled kernels run;
* speed: forward, backward (delta + dK/dV + dQ, or the single pass + dQ cast) and forward+backward, median of
  ``--reps`` CUDA-event timed runs after ``--warmup``; effective TFLOP/s and "x cuDNN per useful FLOP" =
  (cuDNN dense time x mask density) / variant time, with cuDNN dense SDPA timed once in the same run.

``--prewarm N`` first compiles every variant in N worker processes (at the small shape, which Triton specialises like
the benchmark shapes, so the kernels land in its on-disk cache): compilation runs in parallel, ``first call s`` is
then mostly a cache load, and a variant whose compilation crashes or hangs is skipped instead of ending the run.
The end of the run prints (and ``results.json`` keeps under ``best``) the fastest correct forward, deterministic
two-pass backward and single-pass backward per shape, next to the default's times.

A variant that fails to compile or run is reported and skipped.  ``--budget`` (seconds since start) stops starting
new variants so the whole run, Triton compilation included, stays inside the GPU slot.  Writes ``results.json``
and ``table.md`` under ``--out`` (rewritten after every variant, so a killed run keeps what it measured).

``--tiny`` runs the same code on CPU under ``TRITON_INTERPRET=1`` at a tiny radial shape in fp32 (tests).

On the H200 (about 3-4 minutes): ``python3 benchmarks/kernel_variants.py --quick --prewarm 8 --out $OUT/kv``
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

if "--tiny" in sys.argv:  # must precede every @triton.jit decoration
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: sparse_attn
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/: attention.py helpers

from sparse_attn.indices import block_index  # noqa: E402
from sparse_attn.kernels.block_sparse import KernelConfig as C  # noqa: E402
from sparse_attn.kernels.block_sparse import block_sparse_backward, block_sparse_forward, default_configs  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """One kernel setup; ``None`` fields take the default config, ``single`` replaces dK/dV + dQ."""

    name: str
    fwd: C | None = None
    dkdv: C | None = None
    dq: C | None = None
    single: C | None = None


#: Most promising first (``--max-variants`` and ``--budget`` cut from the end); warp-specialised ones last because
#: Triton's Hopper warp specialisation is the likeliest to crash the compiler (a crash ends the run: results.json
#: keeps every variant finished before it).
VARIANTS: list[Variant] = [
    Variant("default"),
    Variant("fwd-fold", fwd=C(128, 128, 8, 3, fold_scale=True)),
    Variant("fwd-fold-lazy", fwd=C(128, 128, 8, 3, fold_scale=True, lazy_rescale=True)),
    Variant("sp-64x128-qmajor", single=C(64, 128, 8, 2, q_major=True)),
    Variant("sp-64x128-swap", single=C(64, 128, 8, 2, dq_reduce="atomic_swap")),
    Variant("sp-64x128-atomic", single=C(64, 128, 8, 2, dq_reduce="atomic")),
    Variant("sp-64x128-tma", single=C(64, 128, 8, 2, tma=True, dq_reduce="tma")),
    Variant("sp-64x128-qmajor-tma", single=C(64, 128, 8, 2, tma=True, dq_reduce="tma", q_major=True)),
    Variant("sp-64x64-swap", single=C(64, 64, 4, 3, dq_reduce="atomic_swap")),
    Variant("dkdv-qmajor", dkdv=C(64, 64, 4, 3, q_major=True)),
    Variant("dq-64x128", dq=C(64, 128, 8, 2)),
    Variant("bwd-128x128", dkdv=C(128, 128, 8, 2), dq=C(128, 128, 8, 2)),
    Variant("dkdv-s4", dkdv=C(64, 64, 4, 4)),
    Variant("fwd-fold-s4", fwd=C(128, 128, 8, 4, fold_scale=True)),
    Variant("fwd-fold-lazy-s2", fwd=C(128, 128, 8, 2, fold_scale=True, lazy_rescale=True)),
    Variant("fwd-fold-ws", fwd=C(128, 128, 8, 3, fold_scale=True, warp_specialize=True)),
    Variant("bwd-ws", dkdv=C(64, 64, 4, 3, warp_specialize=True), dq=C(128, 64, 8, 2, warp_specialize=True)),
    Variant("sp-64x128-swap-ws", single=C(64, 128, 8, 2, dq_reduce="atomic_swap", warp_specialize=True)),
    Variant("all-ws", fwd=C(128, 128, 8, 3, fold_scale=True, lazy_rescale=True, warp_specialize=True),
            dkdv=C(64, 64, 4, 3, warp_specialize=True), dq=C(128, 64, 8, 2, warp_specialize=True)),
    Variant("fwd-64x128-fold", fwd=C(64, 128, 8, 3, fold_scale=True)),
]


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------ timing


def bench(fn, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events on a GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        torch.cuda.synchronize()
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ running a variant


class Runner:
    """The launchers with one variant's configs on one (q, k, v, mask)."""

    def __init__(self, q, k, v, do, mask, block_size: int, variant: Variant):
        self.q, self.k, self.v, self.do = q, k, v, do
        b, h, _, d = q.shape
        self.bs = block_size
        self.scale = d ** -0.5
        self.idx = block_index(mask)
        self.rows = self.idx.schedule(b, h, transposed=False)
        self.cols = self.idx.schedule(b, h, transposed=True)
        self.var = variant

    def fwd(self):
        return block_sparse_forward(self.q, self.k, self.v, self.idx, self.rows, block_size=self.bs, scale=self.scale,
                                    config=self.var.fwd)

    def bwd(self, out, lse):
        single = self.var.single
        return block_sparse_backward(
            self.do, self.q, self.k, self.v, out, lse, self.idx, self.rows, self.cols, block_size=self.bs,
            scale=self.scale, dkdv_config=self.var.dkdv, dq_config=self.var.dq,
            deterministic=single is None, single_pass_config=single,
        )

    def both(self):
        out, lse = self.fwd()
        return (out, *self.bwd(out, lse))


def dense_reference_fp64(q, k, v, do, mask, block_size):
    """(out, dq, dk, dv) of fp64 softmax attention over the kept blocks; rows without a kept key give 0."""
    b, h, n, d = q.shape
    tok = mask.repeat_interleave(block_size, -1).repeat_interleave(block_size, -2)[:n, :n]
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    s = (qd @ kd.transpose(-1, -2)) * d ** -0.5
    s = s.masked_fill(~tok, float("-inf"))
    mx = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)))
    den = p.sum(-1, keepdim=True)
    out = (p @ vd) / torch.where(den == 0, torch.ones_like(den), den)
    out.backward(do.double())
    return out.detach(), qd.grad, kd.grad, vd.grad


def compare(ours, ref) -> dict:
    """Relative Frobenius error and max |diff| / max |ref| of out, dq, dk, dv (the worst of the four)."""
    worst_rel = worst_max = 0.0
    for a, b in zip(ours, ref):
        a, b = a.double(), b.double()
        worst_rel = max(worst_rel, ((a - b).norm() / b.norm().clamp_min(1e-30)).item())
        worst_max = max(worst_max, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    return dict(rel=worst_rel, max_rel=worst_max)


# ------------------------------------------------------------------------------------------------ shapes


@dataclass
class Case:
    name: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor
    mask: torch.Tensor
    density: float
    heads: int
    n: int
    head_dim: int


def _qkv(b, h, n, d, dtype, device, gen):
    """q, k, v, dO stored [B, N, H, D] (the processors' layout), returned as [B, H, N, D] views."""
    return tuple(torch.randn(b, n, h, d, generator=gen, device=device).to(dtype).transpose(1, 2) for _ in range(4))


def bench_case(name: str, device, tiny: bool) -> Case:
    from sparse_attn.radial import radial_block_mask

    if tiny:
        frames, tpf, heads, d, model = 2, 128, 1, 32, "wan"
    else:
        from attention import HEAD_DIM, SHAPES

        shape = SHAPES[name]
        frames, tpf, heads, d, model = shape["frames"], shape["tpf"], shape["heads"], HEAD_DIM, shape["model"]
    mask = radial_block_mask(frames, tpf, block_size=128, model=model, device=device)
    n = frames * tpf
    dtype = torch.float32 if tiny else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = _qkv(1, heads, n, d, dtype, device, gen)
    return Case(name, q, k, v, do, mask, mask.float().mean().item(), heads, n, d)


def small_case(device, tiny: bool) -> Case:
    """fp64-checked shape: a random mask with an empty query-block row.  N = 1920 (15 blocks) specialises like the
    benchmark shapes (N a multiple of 128 and of 16, block count not a multiple of 16), so no extra compilation."""
    gen = torch.Generator(device=device).manual_seed(1)
    n, d, dtype = (384, 32, torch.float32) if tiny else (1920, 128, torch.bfloat16)
    nb = n // 128
    mask = torch.rand(nb, nb, generator=gen, device=device) < 0.4
    mask[:, 0] = True
    mask[1] = False
    heads = 1 if tiny else 2
    q, k, v, do = _qkv(1, heads, n, d, dtype, device, gen)
    return Case("small", q, k, v, do, mask, mask.float().mean().item(), heads, n, d)


# ------------------------------------------------------------------------------------------------ main loop


def cudnn_times(case: Case, warmup: int, reps: int) -> dict:
    """Dense SDPA (cuDNN on a GPU, the math kernel on CPU) fwd and fwd+bwd milliseconds."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.CUDNN_ATTENTION] if case.q.is_cuda else [SDPBackend.MATH]
    q, k, v = (x.detach().requires_grad_() for x in (case.q, case.k, case.v))

    def fwd():
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v)

    def both():
        out = fwd()
        torch.autograd.grad(out, (q, k, v), case.do)

    with torch.no_grad():
        fwd_ms = bench(fwd, warmup, reps)
    return dict(fwd_ms=fwd_ms, fwdbwd_ms=bench(both, warmup, max(3, reps // 2)))


def compile_only(args, chosen: list[Variant]) -> int:
    """Worker of ``--prewarm``: run each variant once at the small shape (same Triton specialisation as the benchmark
    shapes), so its kernels land in Triton's on-disk cache; one START/END line per variant for the parent."""
    device = torch.device("cpu" if args.tiny else "cuda")
    small = small_case(device, args.tiny)
    for var in chosen:
        print(f"PREWARM-START {var.name}", flush=True)
        try:
            Runner(small.q, small.k, small.v, small.do, small.mask, 128, var).both()
            _sync()
            print(f"PREWARM-END {var.name} ok", flush=True)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which reports it per variant
            print(f"PREWARM-END {var.name} error: {type(exc).__name__}: {str(exc)[:300]}".replace("\n", " "), flush=True)
    return 0


def parse_prewarm(output: str, finished: bool) -> dict[str, str]:
    """``{variant: "ok" | "error: ..." | "crashed" | "timeout"}`` from one worker's stdout.

    A variant started but never ended took the worker down (compiler crash) or was still compiling when the
    worker was stopped (``finished=False``): the main run skips it instead of risking the same there.
    """
    status: dict[str, str] = {}
    for line in output.splitlines():
        if line.startswith("PREWARM-START "):
            status[line.split(" ", 1)[1].strip()] = "timeout" if not finished else "crashed"
        elif line.startswith("PREWARM-END "):
            _, name, rest = line.split(" ", 2)
            status[name] = rest.strip()
    return status


def prewarm(args, chosen: list[Variant], t_start: float) -> dict[str, str]:
    """Compile every variant in ``args.prewarm`` worker processes at once (Triton compiles one kernel per process
    at a time), each variant isolated from the main run: a compiler crash costs that variant only."""
    import subprocess

    workers = min(args.prewarm, len(chosen))
    procs = []
    for w in range(workers):
        names = ",".join(v.name for v in chosen[w::workers])
        cmd = [sys.executable, os.path.abspath(__file__), "--compile-only", "--variants", names, "--out", args.out]
        if args.tiny:
            cmd.append("--tiny")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    status: dict[str, str] = {}
    deadline = time.perf_counter() + args.prewarm_timeout
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.perf_counter()))
            finished = True
        except subprocess.TimeoutExpired:
            proc.kill()  # our own worker, by its handle
            out, _ = proc.communicate()
            finished = False
        status.update(parse_prewarm(out, finished))
    log(f"[{time.perf_counter() - t_start:6.1f}s] prewarm ({workers} workers): "
        + ", ".join(f"{k}={v[:60]}" for k, v in status.items()))
    return status


def run(args) -> int:
    device = torch.device("cpu" if args.tiny else "cuda")
    if not args.tiny and not torch.cuda.is_available():
        print("error: needs a CUDA GPU (or --tiny for the CPU interpreter)", file=sys.stderr)
        return 2
    names = [s for s in args.variants.split(",") if s] if args.variants else [v.name for v in VARIANTS]
    known = {v.name: v for v in VARIANTS}
    unknown = [s for s in names if s not in known]
    if unknown:
        print(f"error: --variants: unknown {unknown}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    for flag, value in (("--max-variants", args.max_variants), ("--reps", args.reps)):
        if value < 1:
            print(f"error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.warmup < 0 or args.prewarm < 0:
        print(f"error: --warmup and --prewarm must be >= 0, got {args.warmup} and {args.prewarm}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    import triton

    if "default" not in names and not args.compile_only:
        names.insert(0, "default")  # the reference of every other variant
    chosen = [known[s] for s in names][: args.max_variants]
    if args.compile_only:
        return compile_only(args, chosen)
    shapes = ["tiny"] if args.tiny else (["wan81"] if args.quick else ["wan81", "wan41"])
    warmup, reps = (0, 1) if args.tiny else (args.warmup, args.reps)
    report = dict(env=dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (TRITON_INTERPRET=1)",
                           torch=torch.__version__, triton=triton.__version__, argv=sys.argv,
                           date=datetime.now(timezone.utc).isoformat(timespec="seconds")),
                  defaults={k: asdict(c) for k, c in default_configs(32 if args.tiny else 128,
                                                                     torch.float32 if args.tiny else torch.bfloat16,
                                                                     128).items()},
                  dense={}, rows=[])
    compiled = prewarm(args, chosen, t_start) if args.prewarm > 0 else {}
    report["prewarm"] = compiled
    tol_small = 1e-4 if args.tiny else 2e-2  # vs fp64 (fp32 interpreter / bf16 kernels)
    tol_default = 1e-4 if args.tiny else 1e-2  # vs the default configs' result
    small = small_case(device, args.tiny)
    small_ref = dense_reference_fp64(small.q, small.k, small.v, small.do, small.mask, 128)

    def write() -> None:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(markdown(report) + "\n")

    for shape in shapes:
        case = bench_case(shape, device, args.tiny)
        log(f"[{time.perf_counter() - t_start:6.1f}s] {shape}: N={case.n} H={case.heads} D={case.head_dim} "
            f"density={case.density:.4f}")
        dense = cudnn_times(case, warmup, reps)
        report["dense"][shape] = dense
        log(f"[{time.perf_counter() - t_start:6.1f}s] {shape}: dense SDPA fwd {dense['fwd_ms']:.1f} ms, "
            f"fwd+bwd {dense['fwdbwd_ms']:.1f} ms")
        flops = case.density * 4 * case.heads * case.n ** 2 * case.head_dim
        reference = None
        fwd_times: dict[str, float] = {}
        bwd_times: dict[str, float] = {}
        for var in chosen:
            elapsed = time.perf_counter() - t_start
            row = dict(shape=shape, variant=var.name, density=round(case.density, 4),
                       configs={k: asdict(getattr(var, k)) for k in ("fwd", "dkdv", "dq", "single") if getattr(var, k)})
            if elapsed > args.budget:
                row["error"] = f"skipped: time budget {args.budget:.0f} s spent"
                report["rows"].append(row)
                log(f"[{elapsed:6.1f}s] {shape} {var.name}: skipped (budget)")
                continue
            if compiled.get(var.name, "ok") in ("crashed", "timeout"):
                row["error"] = f"skipped: its compilation {compiled[var.name]} in the prewarm worker"
                report["rows"].append(row)
                log(f"[{elapsed:6.1f}s] {shape} {var.name}: {row['error']}")
                continue
            log(f"[{elapsed:6.1f}s] {shape} {var.name}: compiling / checking ...")
            try:
                runner = Runner(case.q, case.k, case.v, case.do, case.mask, 128, var)
                t0 = time.perf_counter()
                res = runner.both()
                _sync()
                row["first_call_s"] = round(time.perf_counter() - t0, 2)  # Triton compilation included
                if var.name == "default":
                    reference = res  # runs first: the reference of every other variant
                elif reference is not None:
                    row["vs_default"] = compare(res, reference)
                del res
                sres = Runner(small.q, small.k, small.v, small.do, small.mask, 128, var).both()
                row["vs_fp64_small"] = compare(sres, small_ref)
                # a variant that keeps the forward (backward) configs of an earlier one reuses its time
                fkey, bkey = repr(var.fwd), repr((var.dkdv, var.dq, var.single))
                if fkey not in fwd_times:
                    fwd_times[fkey] = bench(runner.fwd, warmup, reps)
                if bkey not in bwd_times:
                    saved = runner.fwd()
                    bwd_times[bkey] = bench(functools.partial(runner.bwd, *saved), warmup, reps)
                    saved = None
                row["fwd_ms"], row["bwd_ms"] = fwd_times[fkey], bwd_times[bkey]
                row["fwdbwd_ms"] = bench(runner.both, warmup, reps)
                row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
                row["fwdbwd_tflops"] = 3.5 * flops / row["fwdbwd_ms"] / 1e9
                row["x_cudnn_fwd"] = dense["fwd_ms"] * case.density / row["fwd_ms"]
                row["x_cudnn_fwdbwd"] = dense["fwdbwd_ms"] * case.density / row["fwdbwd_ms"]
                ok = row["vs_fp64_small"]["rel"] < tol_small
                if "vs_default" in row:
                    ok = ok and row["vs_default"]["rel"] < tol_default
                row["ok"] = ok
                log(f"[{time.perf_counter() - t_start:6.1f}s] {shape} {var.name}: fwd {row['fwd_ms']:.2f} ms, "
                    f"bwd {row['bwd_ms']:.2f} ms, fwd+bwd {row['fwdbwd_ms']:.2f} ms = {row['x_cudnn_fwdbwd']:.3f}x cuDNN "
                    f"per FLOP; first call {row['first_call_s']} s; ok={ok} "
                    f"(fp64 small {row['vs_fp64_small']['rel']:.1e}"
                    + (f", vs default {row['vs_default']['rel']:.1e} / max {row['vs_default']['max_rel']:.1e})"
                       if "vs_default" in row else ")"))
            except Exception as exc:  # a variant that does not compile or run must not hide the others
                row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
                log(f"[{time.perf_counter() - t_start:6.1f}s] {shape} {var.name}: FAILED {row['error'][:300]}")
                traceback.print_exc(limit=2)
            report["rows"].append(row)
            write()
        del case, reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    report["best"] = recommend(report)
    write()
    log(markdown(report))
    log("best per shape (fwd / deterministic two-pass bwd / single-pass bwd): " + json.dumps(report["best"]))
    log(f"total {report['total_s']} s; wrote {os.path.join(args.out, 'results.json')} and table.md")
    return 0


def recommend(report: dict) -> dict:
    """Per shape, the fastest correct forward config, two-pass backward and single-pass backward, and the default's
    times: what :func:`~sparse_attn.kernels.block_sparse.default_configs` should take (fwd and bwd are independent)."""
    out: dict = {}
    for r in report["rows"]:
        if not r.get("ok"):
            continue
        best = out.setdefault(r["shape"], {})
        if r["variant"] == "default":
            best["default"] = dict(fwd_ms=r["fwd_ms"], bwd_ms=r["bwd_ms"], fwdbwd_ms=r["fwdbwd_ms"])
        cfg = r["configs"]
        slots = [("fwd", r["fwd_ms"])] if "fwd" in cfg or r["variant"] == "default" else []
        if "single" in cfg:
            slots.append(("single_pass", r["bwd_ms"]))
        elif "dkdv" in cfg or "dq" in cfg or r["variant"] == "default":
            slots.append(("two_pass", r["bwd_ms"]))
        for slot, ms in slots:
            if slot not in best or ms < best[slot]["ms"]:
                best[slot] = dict(ms=ms, variant=r["variant"])
    return out


def markdown(report: dict) -> str:
    lines = [
        "| shape | variant | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd TF/s | x cuDNN fwd | x cuDNN fwd+bwd | "
        "rel vs default | rel vs fp64 (small) | first call s | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "fwdbwd_ms" not in r:
            lines.append(f"| {r['shape']} | {r['variant']} | {r.get('error', 'error')[:90]} ||||||||||")
            continue
        vd = r.get("vs_default")
        vs_default = f"{vd['rel']:.1e} (max {vd['max_rel']:.1e})" if vd else "reference"
        lines.append(
            f"| {r['shape']} | {r['variant']} | {r['fwd_ms']:.2f} | {r['bwd_ms']:.2f} | {r['fwdbwd_ms']:.2f} | "
            f"{r['fwdbwd_tflops']:.0f} | {r['x_cudnn_fwd']:.3f} | {r['x_cudnn_fwdbwd']:.3f} | "
            f"{vs_default} | {r['vs_fp64_small']['rel']:.1e} | "
            f"{r['first_call_s']} | {'yes' if r['ok'] else 'NO'} |"
        )
    dense = "; ".join(f"{s}: fwd {d['fwd_ms']:.1f} ms, fwd+bwd {d['fwdbwd_ms']:.1f} ms" for s, d in report["dense"].items())
    return "\n".join(lines) + f"\n\nDense SDPA (same run): {dense}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Wan 81 x 1560 only (else also Wan 41 x 1560)")
    p.add_argument("--tiny", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny radial shape, fp32 (tests)")
    p.add_argument("--variants", default="", help="comma list (default: all): " + ",".join(v.name for v in VARIANTS))
    p.add_argument("--max-variants", type=int, default=len(VARIANTS), help="run at most this many (default all)")
    p.add_argument("--budget", type=float, default=270.0, help="start no new variant after this many seconds")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prewarm", type=int, default=0,
                   help="compile the variants first in this many worker processes (parallel, crash-isolated)")
    p.add_argument("--prewarm-timeout", type=float, default=150.0, help="seconds the prewarm workers get")
    p.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)  # a --prewarm worker
    p.add_argument("--out", required=True, help="directory for results.json and table.md")
    args = p.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())

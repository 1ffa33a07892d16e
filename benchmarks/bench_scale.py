"""SNMF fit time and memory against the number of tokens n: in memory, and streamed from a store on disk.

For each n (and each X dtype) the script writes an ActivationStore of synthetic activations
(planted non-negative mixture of k directions plus noise, d columns) in ``--workdir``, then runs each
configuration in its own child process:

- ``memory``: the layer is loaded into memory and fitted with ``SNMF.fit(X)`` (the compiled loop);
- ``held``: ``SNMF.fit(store, on_device=True)``: X read once into device memory, then the compiled
  loop (what a fit of a store does by itself on an accelerator where X fits);
- ``stream``: ``SNMF.fit(store, on_device=False)``, one pass over the store's chunks per iteration, the next chunk
  read and placed on the device by a background thread, codes ``G`` on disk (``codes_on_disk``),
  or in memory with ``--codes-in-memory``;
- ``baseline``: everything but the fit (imports, JAX start-up, opening the store, and compiling
  both fit paths on a tiny slice of the data), to subtract the Python/JAX resident memory.

Seconds per iteration is the slope between two warm fits of different lengths (``--warm`` and
``--warm + --iters`` iterations), the median of ``--repeats`` interleaved runs of each (compilation,
initialization and transfers cancel). GFLOP/s counts 4·n·d·k per
iteration (the products ``X F`` and ``Xᵀ G``). ``% peak`` is that rate over the device's measured
matrix-multiply rate (a square float32 — or bfloat16/float16 with float32 accumulation — product of
``--peak-size``, median of 5, timed in a child). Peak memory is the child's high-water resident set
(``VmHWM``) minus the baseline child's; the stream's budget is two chunks of X (the one computing,
the one being read) plus the factors: 8 d×k arrays, 12 chunk×k arrays (a chunk's codes and the
update's temporaries) and, with ``--codes-in-memory``, G three times (current, next, best). On a GPU
the device's peak bytes in use are reported too. The store is read through the OS page cache (just
written), so the stream measures the engine, not the disk.

    python benchmarks/bench_scale.py                                   # CPU defaults
    python benchmarks/bench_scale.py --sizes 1048576,4194304 --d 4096 --rank 512 \\
        --chunk-tokens 131072 --dtypes float32,bfloat16 --label h100    # a GPU

Prints the section and writes it into ``benchmarks/RESULTS.md`` (``--label``; ``--no-write``: print only),
with the verdict on the CPU targets: streaming at ≥ 70% of the in-memory throughput, and peak memory
within two chunks plus the factors. Scaling with the number of devices is ``bench_devices.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LAYER = 0
RESULT_PREFIX = "RESULT "


# -- data -----------------------------------------------------------------------------------------

def write_store(path: Path, n: int, d: int, k: int, dtype: str, chunk_tokens: int, seed: int = 0):
    """A store of n synthetic activation rows: ``G_true F_trueᵀ + noise``, G_true sparse and ≥ 0."""
    from jsnmf.store import ActivationStore

    if path.exists():
        try:
            store = ActivationStore.open(path)
            if (store.n_tokens, store.d_mlp, store.dtype, store.chunk_bounds[0][1]) == (n, d, dtype, min(chunk_tokens, n)):
                return store
        except ValueError:
            pass
        shutil.rmtree(path)
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(k, d)).astype(np.float32) / np.sqrt(0.1 * k)
    writer = ActivationStore.create(path, layers=[LAYER], d_mlp=d, dtype=dtype, chunk_tokens=chunk_tokens)
    for start in range(0, n, chunk_tokens):
        rows = min(chunk_tokens, n - start)
        codes = (rng.exponential(size=(rows, k)) * (rng.random((rows, k)) < 0.1)).astype(np.float32)
        X = codes @ directions + 0.1 * rng.standard_normal((rows, d), dtype=np.float32)
        zeros = np.zeros(rows, np.int32)
        writer.append({LAYER: X}, zeros, zeros, np.arange(rows, dtype=np.int32), zeros - 1)
    return writer.close()


# -- children -------------------------------------------------------------------------------------

def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> int:
    """Reset the high-water mark (``VmHWM``) to the current resident set, and return that (Linux)."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def steady_slope(fit, args, compile_long: bool) -> dict:
    """:func:`slope`, and the memory the timed (warm) fits add above what the process held before them."""
    fit(args.warm)  # compile (and the compilers' own memory) before the high-water mark is reset
    if compile_long:
        fit(args.warm + args.iters)
    held = reset_peak_rss()
    seconds = slope(fit, args.warm, args.warm + args.iters, compile_long=False, repeats=args.repeats, warm=False)
    return {"seconds": seconds, "steady": peak_rss_bytes() - held}


def device_peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def model(args, **extra):
    from jsnmf import SNMF

    return SNMF(args.rank, solver=args.solver, sparsity=args.sparsity, tol=0.0, patience=10**9, seed=0, **extra)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def slope(fit, short: int, long: int, compile_long: bool, repeats: int, warm: bool = True) -> float:
    """Seconds per iteration: the slope between warm fits of ``short`` and ``long`` iterations.

    Each length is timed ``repeats`` times, interleaved (so slow drifts of a shared machine hit
    both alike), and the medians are subtracted: start-up, initialization and compilation cancel.
    """
    if warm:
        fit(short)  # compile
    if compile_long:
        fit(long)
    shorts, longs = [], []
    for _ in range(repeats):
        shorts.append(median_seconds(lambda: fit(short), 1))
        longs.append(median_seconds(lambda: fit(long), 1))
    return (float(np.median(longs)) - float(np.median(shorts))) / (long - short)


def child_peak(args) -> dict:
    import jax
    import jax.numpy as jnp

    from jsnmf.kernels.steps import matmul_f32

    dtype = jnp.dtype(args.dtype)
    size = args.peak_size
    key_a, key_b = jax.random.split(jax.random.key(0))
    A = jax.random.normal(key_a, (size, size), jnp.float32).astype(dtype)
    B = jax.random.normal(key_b, (size, size), jnp.float32).astype(dtype)
    product = jax.jit(matmul_f32)
    product(A, B).block_until_ready()
    seconds = median_seconds(lambda: product(A, B).block_until_ready(), 5)
    return {"gflops": 2 * size**3 / seconds / 1e9, "device": str(jax.devices()[0].device_kind)}


def child_baseline(args) -> dict:
    """Everything a fit child does except the fit: imports, JAX, the store, compiling on a tiny slice."""
    import jax.numpy as jnp

    from jsnmf.store import ActivationStore

    store = ActivationStore.open(args.store)
    tiny = store.read(LAYER, 0, 2 * args.rank, raw=True)
    model(args, max_iter=2, dtype=args.dtype).fit(jnp.asarray(tiny), progress=False)
    model(args, max_iter=2, dtype=args.dtype).fit(np.asarray(tiny), chunk_tokens=args.rank, progress=False)
    return {"peak_rss": peak_rss_bytes()}


def child_memory(args) -> dict:
    import jax
    import jax.numpy as jnp

    from jsnmf.store import ActivationStore

    store = ActivationStore.open(args.store)
    X = jax.device_put(jnp.asarray(store.read(LAYER, raw=True), args.dtype))
    result = steady_slope(lambda iters: model(args, max_iter=iters, dtype=args.dtype).fit(X, progress=False), args,
                          compile_long=True)
    return dict(result, peak_rss=peak_rss_bytes(), device_peak=device_peak_bytes())


def child_stream(args) -> dict:
    from jsnmf.store import ActivationStore

    store = ActivationStore.open(args.store)
    codes = False if args.codes_in_memory else Path(args.store).parent / f"codes-{os.getpid()}"
    first = {}

    def fit(iters):
        # on_device=False: on an accelerator an automatic choice would hold X there (child_held).
        model(args, max_iter=iters, dtype=args.dtype).fit(store, codes_on_disk=codes, on_device=False, progress=False)
        first.setdefault("peak_rss", peak_rss_bytes())  # the first fit, compilation included

    try:
        result = steady_slope(fit, args, compile_long=False)
    finally:
        if codes:
            shutil.rmtree(codes, ignore_errors=True)
    return dict(result, peak_rss=first["peak_rss"], device_peak=device_peak_bytes())


def child_held(args) -> dict:
    """``SNMF.fit(store, on_device=True)``: X read once from the store into device memory, chunk by chunk,
    then the in-memory loop (what an automatic fit does on an accelerator when X fits there). Each timed
    fit loads X again, so the slope between two fits is the held iteration."""
    from jsnmf.store import ActivationStore

    store = ActivationStore.open(args.store)
    first = {}

    def fit(iters):
        model(args, max_iter=iters, dtype=args.dtype).fit(store, on_device=True, progress=False)
        first.setdefault("peak_rss", peak_rss_bytes())

    result = steady_slope(fit, args, compile_long=False)
    return dict(result, peak_rss=first["peak_rss"], device_peak=device_peak_bytes())


CHILDREN = {"peak": child_peak, "baseline": child_baseline, "memory": child_memory, "stream": child_stream,
            "held": child_held}
MODES = ("memory", "stream", "held")


def run_child(args, mode: str, store: Path | None, dtype: str) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--dtype", dtype, "--rank", str(args.rank),
               "--solver", args.solver, "--sparsity", str(args.sparsity), "--iters", str(args.iters),
               "--warm", str(args.warm), "--peak-size", str(args.peak_size), "--repeats", str(args.repeats)]
    if store is not None:
        command += ["--store", str(store)]
    if args.codes_in_memory:
        command.append("--codes-in-memory")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"child {mode} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")


# -- the table ------------------------------------------------------------------------------------

def mib(x: float | None) -> str:
    return "—" if x is None else f"{x / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="65536,131072,262144", help="comma-separated n (tokens)")
    parser.add_argument("--d", type=int, default=1024, help="d_mlp")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--chunk-tokens", type=int, default=16384)
    parser.add_argument("--dtypes", default="float32", help="X dtypes: float32,bfloat16,float16")
    parser.add_argument("--solver", default="mu", choices=["mu", "hals"])
    parser.add_argument("--sparsity", type=float, default=0.01)
    parser.add_argument("--iters", type=int, default=8, help="iterations between the two timed fits")
    parser.add_argument("--warm", type=int, default=2, help="iterations of the shorter timed fit")
    parser.add_argument("--repeats", type=int, default=3, help="each timed fit is the median of this many")
    parser.add_argument("--label", default=None, help="RESULTS.md section label (default: the device)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=0,
                        help="glibc MALLOC_MMAP_THRESHOLD_ for the children (e.g. 1048576: freed buffers go back "
                             "to the OS at once instead of fragmenting the heap); 0 = glibc's default")
    parser.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak (default 4096 CPU, 8192 GPU)")
    parser.add_argument("--codes-in-memory", action="store_true", help="stream with G in memory, not on disk")
    parser.add_argument("--workdir", default=None, help="where the stores go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the stores (default: delete a temporary workdir)")
    parser.add_argument("--device-label", default=None, help="label for the table (default: the device kind)")
    parser.add_argument("--child", default=None, choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(RESULT_PREFIX + json.dumps(CHILDREN[args.child](args)), flush=True)
        return

    # The parent never starts JAX on the device (it would hold device memory the children need).
    import tempfile

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="jsnmf-bench-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    dtypes = args.dtypes.split(",")
    if args.peak_size is None:
        on_gpu = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                                capture_output=True, text=True).stdout.strip() not in ("cpu", "")
        args.peak_size = 8192 if on_gpu else 4096
    header = ["n", "X dtype", "mode", "s / iter", "GFLOP/s", "% matmul peak", "speed / memory's",
              "steady fit memory MiB", "= chunks of X", "stream budget MiB", "first fit memory MiB",
              "device peak MiB"]
    table = []
    peaks = {}
    label = args.device_label
    try:
        for dtype in dtypes:
            peak = run_child(args, "peak", None, dtype)
            peaks[dtype] = peak["gflops"]
            label = label or peak["device"]
            print(f"# {dtype} matmul peak ({args.peak_size}³): {peak['gflops']:.1f} GFLOP/s on {peak['device']}",
                  file=sys.stderr, flush=True)
            for n in sizes:
                path = workdir / f"store-n{n}-d{args.d}-{dtype}"
                write_store(path, n, args.d, args.rank, dtype, args.chunk_tokens)
                baseline = run_child(args, "baseline", path, dtype)["peak_rss"]
                flops = 4 * n * args.d * args.rank
                results = {mode: run_child(args, mode, path, dtype) for mode in MODES}
                itemsize = np.dtype(np.float32).itemsize if dtype == "float32" else 2
                rows = min(args.chunk_tokens, n)
                chunk = rows * args.d * itemsize
                # Budget: two chunks of X (computing, being read) + the factors: 8 F-sized (d×k)
                # arrays and 12 codes arrays of one chunk (C×k: the codes read and written, P = XF,
                # the update's temporaries), + G (current, next, best) when it is in memory.
                factors = 8 * args.d * args.rank * 4 + 12 * rows * args.rank * 4
                if args.codes_in_memory:
                    factors += 3 * n * args.rank * 4
                for mode in MODES:
                    r = results[mode]
                    rate = flops / r["seconds"] / 1e9
                    ratio = results["memory"]["seconds"] / r["seconds"]
                    steady = r["steady"]
                    table.append([f"{n:,}", dtype, mode, f"{r['seconds']:.3f}", f"{rate:,.1f}",
                                  f"{100 * rate / peaks[dtype]:.0f}%", f"{ratio:.2f}" if mode != "memory" else "",
                                  mib(steady), f"{steady / chunk:.1f}",
                                  mib(2 * chunk + factors) if mode == "stream" else "",
                                  mib(r["peak_rss"] - baseline), mib(r.get("device_peak"))])
                    print(" | ".join(table[-1]), file=sys.stderr, flush=True)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    from common import markdown_table, write_section  # noqa: E402  (benchmarks/common.py)

    malloc = (f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}" if args.malloc_mmap_threshold
              else "glibc's default malloc")
    ratios = [float(row[6]) for row in table if row[2] == "stream"]
    within = [float(row[7].replace(",", "")) <= float(row[9].replace(",", "")) for row in table if row[2] == "stream"]
    text = "\n".join([
        f"### Scaling with n, in memory, held on the device and streamed from disk (`bench_scale.py`), {label}",
        "",
        f"d = {args.d}, k = {args.rank}, solver {args.solver}, sparsity {args.sparsity}, "
        f"chunks of {args.chunk_tokens:,} tokens, G {'in memory' if args.codes_in_memory else 'on disk'} "
        f"when streaming; matmul peak "
        + ", ".join(f"{dt} {p:,.1f} GFLOP/s" for dt, p in peaks.items()) + f" ({args.peak_size}³).",
        "",
        markdown_table(header, table),
        "",
        f"s / iter: slope between fits of {args.warm} and {args.warm + args.iters} iterations, medians of "
        f"{args.repeats} interleaved runs each (a held fit reads X from the store into device memory in each "
        f"timed fit, so its slope is the held iteration; the steady memory of a held fit includes X). "
        f"steady fit memory = the highest resident set (VmHWM) during "
        f"the timed fits minus the resident set before them (the high-water mark reset after a first fit "
        f"compiled everything): what a fit adds to the process, X of the in-memory fit excluded since it was "
        f"loaded before. first fit memory = the peak of the child's first fit (compilation included) minus "
        f"that of a child doing everything but the fit ({malloc}). stream budget = 2 chunks of X + 8 d×k + 12 "
        f"chunk×k float32 arrays{' + 3 n×k (G)' if args.codes_in_memory else ''}.",
        "",
        f"Targets: streaming at ≥ 70% of the in-memory throughput: "
        f"{'met' if min(ratios) >= 0.7 else 'MISSED'} (stream / memory {min(ratios):.2f}–{max(ratios):.2f}); "
        f"peak memory ≤ 2 chunks + factors: {'met' if all(within) else 'MISSED'} "
        f"({sum(within)}/{len(within)} sizes within the budget, steady fit memory).",
    ])
    print(text)
    if not args.no_write:
        write_section("bench_scale", args.label or re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-"), text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()

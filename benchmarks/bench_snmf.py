"""SNMF engine throughput and time-to-quality, against the device's matmul rate and a peer.

Measures, in one run on the same data (GELU-shaped activations with planted low-rank structure,
n × d, rank k):

1. the float32 matrix-multiply rate of the dominant product ``X @ F`` (n×d · d×k);
2. seconds per iteration and effective GFLOP/s (4·n·d·k per iteration) of ``jsnmf.SNMF`` for
   each solver (sparsity on), and their ratio to (1);
3. the same for overcomplete's ``SemiNMF`` multiplicative update (PyTorch), the peer;
4. with sparsity 0.01, the relative error that 400 iterations of ``mu`` reach, and how long each
   solver takes to reach it.

Per-iteration time is the slope between two warm fits of different lengths (compilation,
initialization and transfers cancel). Every per-iteration row is measured the same way: in its own
fresh Python process (``--row``), with the same two iteration counts, the library's default threads,
and nothing else of the benchmark loaded. The peer row is compared with jsnmf ``mu`` without
sparsity, the same work as overcomplete's update. (Timing the peer in the process that had just run
the JAX fits, with 5× fewer iterations, made it 9× slower than alone: see RESULTS.md.) Writes its
section of ``benchmarks/RESULTS.md``.

    python benchmarks/bench_snmf.py                 # n=8192, d=3072, k=100
    python benchmarks/bench_snmf.py --n 2048 --d 768 --k 32 --mu-iters 100   # quick
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import tempfile
import statistics
import sys
import time
import types

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from common import default_label, markdown_table, median_seconds, write_section  # noqa: E402


def gelu_activations(n: int, d: int, k: int, noise: float = 1.0, seed: int = 0) -> np.ndarray:
    """MLP-like activations: ``gelu`` of a sparse non-negative mixture of k sparse neuron groups
    (about 1% of the neurons each, like the paper's features) plus dense noise."""
    rng = np.random.default_rng(seed)
    codes = rng.exponential(size=(n, k)) * (rng.random((n, k)) < 0.1)
    directions = 3.0 * rng.normal(size=(k, d)) * (rng.random((k, d)) < 0.01)
    pre = codes @ directions + noise * rng.normal(size=(n, d)) - 0.5
    return (0.5 * pre * (1 + np.tanh(0.7978845608 * (pre + 0.044715 * pre**3)))).astype(np.float32)


def matmul_rate(X, k: int) -> float:
    """GFLOP/s of ``X @ F`` on JAX's default device, in X's dtype, accumulated in float32."""
    import jax
    import jax.numpy as jnp

    F = jnp.asarray(np.random.default_rng(1).normal(size=(X.shape[1], k)), X.dtype)
    product = jax.jit(lambda X, F: jnp.matmul(X, F, preferred_element_type=jnp.float32))
    seconds = median_seconds(lambda: product(X, F).block_until_ready(), repeats=9, warmup=2)
    return 2 * X.shape[0] * X.shape[1] * k / seconds / 1e9


def jsnmf_fit_seconds(X, k: int, solver: str, iters: int, sparsity: float | None, repeats: int = 3) -> float:
    from jsnmf import SNMF

    def fit():
        model = SNMF(k, solver=solver, sparsity=sparsity, max_iter=iters, patience=10**9, tol=0.0,
                     seed=0, dtype=str(X.dtype)).fit(X, progress=False)
        return model

    return median_seconds(fit, repeats=repeats, warmup=0)


def per_iteration(fit_seconds, short: int, long: int) -> float:
    """Slope of wall time against iteration count between two warm fits."""
    fit_seconds(short)  # compile
    return (fit_seconds(long) - fit_seconds(short)) / (long - short)


def _versus(jsnmf_seconds: float, peer_seconds: float) -> str:
    """The per-iteration comparison in words, whichever is faster."""
    if peer_seconds >= jsnmf_seconds:
        return f"jsnmf `mu` (no sparsity) is {peer_seconds / jsnmf_seconds:.2f}× faster"
    return f"the peer is {jsnmf_seconds / peer_seconds:.2f}× faster than jsnmf `mu` (no sparsity)"


def load_overcomplete():
    """overcomplete's SNMF solver without its package ``__init__``.

    The top-level package imports its vision models and with them torchvision, which cannot be
    installed beside the CPU build of torch these machines use; the solver itself needs only torch.
    """
    spec = importlib.util.find_spec("overcomplete")
    if spec is None:
        return None
    if "overcomplete" not in sys.modules:
        package = types.ModuleType("overcomplete")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["overcomplete"] = package
    from overcomplete.optimization.semi_nmf import snmf_multiplicative_update

    return snmf_multiplicative_update


def overcomplete_per_iteration(X: np.ndarray, k: int, short: int, long: int, device: str) -> float | None:
    update = load_overcomplete()
    if update is None:
        return None
    import torch

    A = torch.from_numpy(X).to(device)
    generator = torch.Generator().manual_seed(0)
    Z0 = torch.rand(X.shape[0], k, generator=generator).to(device)
    D0 = torch.randn(k, X.shape[1], generator=generator).to(device)

    def run(iters):
        def once():
            update(A, Z0.clone(), D0.clone(), max_iter=iters, tol=0)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        return median_seconds(once, repeats=3, warmup=0)

    return per_iteration(run, short, long)


def row_child(job: dict) -> dict:
    """One per-iteration row in this fresh process: ``job`` names the data file, what to time and how."""
    X_host = np.load(job["data"])
    if job["kind"] == "overcomplete":
        import torch

        seconds = overcomplete_per_iteration(X_host, job["k"], job["short"], job["long"], job["device"])
        return {"seconds": seconds, "threads": torch.get_num_threads(), "load": os.getloadavg()[0]}
    import jax.numpy as jnp

    X = jnp.asarray(X_host, job["dtype"])
    seconds = per_iteration(lambda it: jsnmf_fit_seconds(X, job["k"], job["solver"], it, job["sparsity"]),
                            job["short"], job["long"])
    return {"seconds": seconds, "load": os.getloadavg()[0]}


def run_row(job: dict) -> dict:
    """:func:`row_child` in a fresh Python process."""
    done = subprocess.run([sys.executable, __file__, "--row", json.dumps(job)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"row {job['kind']} {job.get('solver', '')} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_to_target(X, k: int, mu_iters: int, sparsity: float) -> dict:
    """Relative error of ``mu_iters`` iterations of mu (random start, the paper's setting), and the
    wall time of each ``hals`` configuration to reach it, initialization included."""
    from jsnmf import SNMF

    def fit(solver, iters, init="random"):
        return SNMF(k, solver=solver, sparsity=sparsity, init=init, max_iter=iters, patience=10**9, tol=0.0,
                    seed=0, dtype=str(X.dtype)).fit(X, progress=False)

    for init in ("random", "svd"):  # compile both loops (block size 50) and the initializers
        fit("mu", 50, init), fit("hals", 50, init)
    start = time.perf_counter()
    mu = fit("mu", mu_iters)
    mu_seconds = time.perf_counter() - start
    target = float(mu.loss_history_.min())
    sq_norm = float(np.sum(np.asarray(X, np.float64) ** 2))
    result = {"target_rel_err": np.sqrt(target / sq_norm), "mu_iters": mu_iters, "mu_seconds": mu_seconds,
              "hals": {}}
    for init in ("random", "svd"):
        probe = fit("hals", mu_iters, init)
        reached = np.nonzero(probe.loss_history_ <= target)[0]
        if reached.size == 0:
            result["hals"][init] = None
            continue
        iters = int(reached[0]) + 1
        times = []
        for _ in range(3):
            start = time.perf_counter()
            model = fit("hals", iters, init)
            times.append(time.perf_counter() - start)
        assert model.loss_history_.min() <= target
        result["hals"][init] = {"iters": iters, "seconds": statistics.median(times)}
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=3072)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--sparsity", type=float, default=0.01)
    parser.add_argument("--noise", type=float, default=1.0, help="dense noise level of the synthetic activations")
    parser.add_argument("--mu-iters", type=int, default=400, help="iterations of mu that set the target error")
    parser.add_argument("--short", type=int, default=50, help="iterations of the shorter timing fit")
    parser.add_argument("--long", type=int, default=150, help="iterations of the longer timing fit")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="precision X is held in (products accumulate in float32)")
    parser.add_argument("--peer-device", default="cpu", help="torch device for overcomplete (cpu or cuda)")
    parser.add_argument("--no-peer", action="store_true", help="skip overcomplete")
    parser.add_argument("--solvers", default=None,
                        help="comma-separated codes solvers to time (default: every registered one, SNMF.solvers)")
    parser.add_argument("--label", default=None, help="machine label of the RESULTS.md section")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--no-target", action="store_true", help="skip the time-to-target part (per-iteration rows only)")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:
        print(json.dumps(row_child(json.loads(args.row))))
        return

    import jax
    import jax.numpy as jnp

    n, d, k = args.n, args.d, args.k
    if args.solvers is None:
        from jsnmf import SNMF

        args.solvers = ",".join(SNMF.solvers)
    flops = 4 * n * d * k
    X_host = gelu_activations(n, d, k, noise=args.noise)
    X = jnp.asarray(X_host, args.dtype)
    rate = matmul_rate(X, k)
    print(f"matmul X@F ({n}x{d} · {d}x{k}) {args.dtype}: {rate:.1f} GFLOP/s on {jax.devices()[0]}", flush=True)

    rows = []
    seconds = {}
    scratch = tempfile.mkdtemp(prefix="bench-snmf-")
    data = os.path.join(scratch, "X.npy")
    np.save(data, X_host)
    row = {"data": data, "k": k, "short": args.short, "long": args.long, "dtype": args.dtype}
    peer = not args.no_peer and args.dtype == "float32" and load_overcomplete() is not None
    if not args.no_peer and args.dtype == "float32" and not peer:
        print("overcomplete is not installed: pip install --no-deps overcomplete einops scikit-learn")
    timed = [(solver, args.sparsity) for solver in args.solvers.split(",")] + ([("mu", None)] if peer else [])
    for solver, sparsity in timed:
        result = run_row({**row, "kind": "jsnmf", "solver": solver, "sparsity": sparsity})
        s = seconds[solver, sparsity] = result["seconds"]
        gflops = flops / s / 1e9
        name = f"jsnmf `{solver}`" + (" (no sparsity)" if sparsity is None else "")
        rows.append([name, f"{s * 1e3:.1f}", f"{gflops:.1f}", f"{gflops / rate:.0%}", "—", f"{result['load']:.1f}"])
        print(f"{name}: {s * 1e3:.1f} ms/iteration, {gflops:.1f} GFLOP/s, {gflops / rate:.0%} of matmul", flush=True)

    if peer:
        result = run_row({**row, "kind": "overcomplete", "device": args.peer_device})
        s = result["seconds"]
        gflops = flops / s / 1e9
        rows.append([f"overcomplete `SemiNMF` mu (torch {result['threads']} threads, {args.peer_device}, no sparsity)",
                     f"{s * 1e3:.1f}", f"{gflops:.1f}", f"{gflops / rate:.0%}",
                     _versus(seconds['mu', None], s), f"{result['load']:.1f}"])
        print(f"overcomplete: {s * 1e3:.1f} ms/iteration, {gflops:.1f} GFLOP/s", flush=True)

    target = None if args.no_target else time_to_target(X, k, args.mu_iters, args.sparsity)
    print(f"time to target: {target}", flush=True)

    body = [f"### SNMF engine (`bench_snmf.py`), n={n}, d={d}, k={k}, sparsity={args.sparsity}, noise {args.noise}, X in {args.dtype}", "",
            f"Measured {args.dtype} matmul rate of the dominant product `X @ F`: **{rate:.1f} GFLOP/s**. "
            "Per-iteration time is the slope between two warm fits "
            f"({args.short} and {args.long} iterations, median of 3 each), every row in its own fresh process with the "
            "library's default threads; effective GFLOP/s counts 4·n·d·k per iteration.", "",
            markdown_table(["solver", "ms / iteration", "effective GFLOP/s", "of matmul rate", "vs peer",
                            "load average at the end"], rows), ""]
    if target is not None:
        body.append(f"Time to the relative error that {target['mu_iters']} iterations of `mu` reach from a random "
                    f"start ({target['target_rel_err']:.4f}, sparsity {args.sparsity}, noise {args.noise}): "
                    f"`mu` {target['mu_seconds']:.2f} s.")
        body.append("")
        speed_rows = []
        for init, found in target["hals"].items():
            if found is None:
                speed_rows.append([f"`hals`, init `{init}`", f"not reached in {target['mu_iters']}", "—", "—"])
            else:
                speed_rows.append([f"`hals`, init `{init}`", found["iters"], f"{found['seconds']:.2f}",
                                   f"{target['mu_seconds'] / found['seconds']:.1f}×"])
        body.append(markdown_table(["solver", "iterations to target", "seconds (init included)", "faster than `mu`"],
                                   speed_rows))
    text = "\n".join(body)
    print("\n" + text)
    if not args.no_write:
        label = args.label or default_label()
        suffix = ("" if args.dtype == "float32" else f"-{args.dtype}") + ("" if args.noise == 1.0 else f"-noise{args.noise}")
        write_section("bench_snmf", label + suffix, text)


if __name__ == "__main__":
    main()

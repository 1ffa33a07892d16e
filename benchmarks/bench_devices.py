"""Sharded SNMF fit: seconds per iteration and GFLOP/s against the number of devices.

The tokens are split over a mesh of 1, 2, 4, 8 devices (axis ``data``); the work per iteration is
about ``4·n·d·k`` flops (the products ``X F`` and ``Xᵀ G``). Per-iteration time is the slope between
two warm fits of different lengths, so compilation, initialization and transfers cancel.

* On a GPU/TPU machine the real devices are used (meshes over the first 1, 2, 4, ... of them).
* On a CPU the devices are simulated (``XLA_FLAGS=--xla_force_host_platform_device_count=N``), one
  subprocess per count. Simulated devices share the same cores, so the CPU table measures the
  overhead of sharding (the ``shard_map``, the all-reduce, the padding), not a speedup.

Prints a markdown table (it does not write RESULTS.md).

    python benchmarks/bench_devices.py                       # n=16384, d=1024, k=64
    python benchmarks/bench_devices.py --n 4096 --d 512 --k 32 --devices 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from common import machine_description, markdown_table  # noqa: E402


def activations(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    """MLP-like activations: gelu of a sparse non-negative mixture of k directions plus noise."""
    rng = np.random.default_rng(seed)
    codes = rng.exponential(size=(n, k)) * (rng.random((n, k)) < 0.1)
    directions = rng.normal(size=(k, d)) / np.sqrt(k * 0.1)
    pre = codes @ directions + rng.normal(size=(n, d)) - 0.5
    return (0.5 * pre * (1 + np.tanh(0.7978845608 * (pre + 0.044715 * pre**3)))).astype(np.float32)


def seconds_per_iteration(X, k: int, solver: str, mesh, short: int, long: int, repeats: int) -> float:
    """Slope of the fit's wall time between ``short`` and ``long`` iterations (warm, median of repeats)."""
    from jsnmf import SNMF

    def fit(iters: int) -> float:
        start = time.perf_counter()
        SNMF(k, solver=solver, sparsity=0.01, max_iter=iters, patience=10**9, tol=0.0).fit(
            X, mesh=mesh, progress=False)
        return time.perf_counter() - start

    fit(short), fit(long)  # compile both block sizes
    slopes = [(fit(long) - fit(short)) / (long - short) for _ in range(repeats)]
    return float(np.median(slopes))


def measure(device_counts, args) -> list[dict]:
    """One row per (device count, solver) on the devices this process sees."""
    import jax
    from jax.sharding import Mesh

    X = activations(args.n, args.d, args.k)
    meshes = [(str(count), Mesh(np.array(jax.devices()[:count]), ("data",))) for count in device_counts]
    if jax.device_count() == 1:  # the plain single-device path (no shard_map), for comparison
        meshes.insert(0, ("1 (unsharded)", None))
    rows = []
    for label, mesh in meshes:
        for solver in args.solvers:
            seconds = seconds_per_iteration(X, args.k, solver, mesh, args.short, args.long, args.repeats)
            rows.append({"devices": label, "solver": solver, "seconds": seconds,
                         "gflops": 4 * args.n * args.d * args.k / seconds / 1e9})
    return rows


def simulated(count: int, args) -> list[dict]:
    """Run :func:`measure` in a subprocess with ``count`` simulated CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")
    command = [sys.executable, __file__, "--worker", str(count), "--n", str(args.n), "--d", str(args.d),
               "--k", str(args.k), "--short", str(args.short), "--long", str(args.long),
               "--repeats", str(args.repeats), "--solvers", *args.solvers]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"worker with {count} devices failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--solvers", nargs="+", default=["mu", "hals"])
    parser.add_argument("--short", type=int, default=5, help="iterations of the short fit")
    parser.add_argument("--long", type=int, default=15, help="iterations of the long fit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per simulated-device worker")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:  # inside a subprocess with simulated devices
        print(json.dumps(measure([args.worker], args)))
        return

    import jax

    if jax.devices()[0].platform != "cpu":
        counts = [c for c in args.devices if c <= jax.device_count()]
        rows = measure(counts, args)
        note = "real devices"
    else:
        rows = [row for count in args.devices for row in simulated(count, args)]
        note = ("simulated CPU devices sharing the same cores: the table shows the overhead of sharding, "
                "not a speedup")
    base = {}
    for row in rows:  # the first row of each solver (the unsharded or fewest-device run) is the baseline
        base.setdefault(row["solver"], row["seconds"])
    table = markdown_table(
        ["devices", "solver", "s / iteration", "GFLOP/s (4·n·d·k)", "time vs first row"],
        [[row["devices"], row["solver"], f"{row['seconds']:.4f}", f"{row['gflops']:.1f}",
          f"{row['seconds'] / base[row['solver']]:.2f}×"] for row in rows],
    )
    print(f"n={args.n}, d={args.d}, k={args.k}, sparsity 0.01; {note}.\n")
    print(table)
    print(f"\n_{machine_description()}_")


if __name__ == "__main__":
    main()

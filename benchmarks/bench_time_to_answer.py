"""Time to an answer: wall-clock seconds from ``fit()`` to a given relative error, in a fresh process,
compilation included, with and without JAX's persistent compilation cache.

Same data as ``bench_snmf.py`` (GELU-shaped activations, n × d, planted rank k, sparsity 0.01). Every
timed fit runs in its own fresh Python process (``--child``), so each pays what a user pays: backend
start, transfer, initialization, compilation, iterations. The clock starts at the ``fit`` call
(imports and loading ``X`` are reported apart) and stops when the factors are back on the host.

A configuration is a solver (``ehals``: random start, the paper's) or ``solver/init`` (``ehals/tokens``).

Targets:

1. **the paper's error**: the relative error of the best iterate of 100 iterations of the paper's
   own fit (``NMFSemiNMF.fit``: random start, winner-take-all sparsity, multiplicative update, dense
   loss each iteration, best iterate kept), re-written here in PyTorch from its description
   (``notes/ecosystem.md`` §4.0) and timed the same way in a fresh process (its ``fit`` call).
2. **400 iterations of ``mu``**: the error jsnmf's ``mu`` reaches in 400 iterations (random start).

For each target, each solver is first run once untimed (a probe, up to ``--probe-iters``) to find
the iterations it needs; then it is timed with ``max_iter`` set to that count, in a first process
with an empty cache folder (``cold``: it compiles and writes the cache) and a second process with the
same folder (``warm``: it reads the executables back). Medians over ``--repeats`` (cold, warm) pairs;
the repeats of different configurations alternate, so a ratio is of figures from the same run.

    python benchmarks/bench_time_to_answer.py                      # n=8192, d=3072, k=100, noise 1.0 and 0.5
    python benchmarks/bench_time_to_answer.py --n 2048 --d 768 --k 32 --noise 1.0 --repeats 1 --no-write
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_section  # noqa: E402

# Configurations: a solver, or solver/init (the random start otherwise, the paper's).
SOLVERS = ("mu", "hals", "apg", "ehals", "ehals/tokens")
PAPER_ITERS = 100


# -- the paper's fit, as its code does it (PyTorch), for the peer row -----------------------------


def paper_fit(A, K: int, max_iter: int, sparsity: float = 0.01, reg: float = 1e-6, tol: float = 1e-4, seed: int = 0):
    """The paper's ``NMFSemiNMF.fit`` on ``A`` (d × n, its convention), random start; returns the
    best loss ``‖A − F Gᵀ‖²`` (an improvement counts when larger than ``tol``, absolute, as there)."""
    import torch

    torch.manual_seed(seed)
    d, n = A.shape
    G = torch.rand(n, K).clamp_min(1e-6)
    F = torch.randn(d, K)
    keep = max(1, math.ceil(sparsity * d))
    best_loss, since = float("inf"), 0
    with torch.no_grad():
        for _ in range(max_iter):
            F = A @ G @ torch.linalg.inv(G.T @ G + reg * torch.eye(K))
            threshold = torch.topk(F.abs(), keep, dim=0, sorted=True).values[-1]
            F = F * (F.abs() >= threshold)
            norms = G.norm(dim=0).clamp_min(1e-8)
            G, F = G / norms, F * norms
            P, Q = A.T @ F, F.T @ F
            numerator = (P.abs() + P) / 2 + G @ ((Q.abs() - Q) / 2)
            denominator = (P.abs() - P) / 2 + G @ ((Q.abs() + Q) / 2)
            G = G * torch.sqrt(numerator / (denominator + 1e-6))
            loss = (torch.norm(A - F @ G.T, p="fro") ** 2).item()  # the paper forms the product each iteration
            if loss < best_loss - tol:
                best_loss, since = loss, 0
                best = (F.clone(), G.clone())  # noqa: F841  kept as the paper keeps it
            else:
                since += 1
    return best_loss


# -- one fresh process per timed fit --------------------------------------------------------------


def child(job: dict) -> dict:
    started = time.perf_counter()
    if job["kind"] == "paper":
        import torch

        imported = time.perf_counter()
        X = np.load(job["data"])
        A = torch.from_numpy(X).T  # (d, n) as the paper holds it
        sq_norm = float(np.sum(X.astype(np.float64) ** 2))
        loaded = time.perf_counter()
        best = paper_fit(A, job["k"], job["iters"], sparsity=job["sparsity"])
        fit_seconds = time.perf_counter() - loaded
        return {"fit_s": fit_seconds, "import_s": imported - started, "rel_err": math.sqrt(best / sq_norm),
                "threads": torch.get_num_threads()}

    from jax import monitoring

    compiles, hits = [], []
    monitoring.register_event_duration_secs_listener(
        lambda event, duration, **_: compiles.append(duration)
        if event == "/jax/core/compile/backend_compile_duration" else None)
    monitoring.register_event_listener(
        lambda event, **_: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None)
    import jax

    from jsnmf import SNMF

    imported = time.perf_counter()
    X = np.load(job["data"])
    sq_norm = float(np.sum(X.astype(np.float64) ** 2))
    loaded = time.perf_counter()
    solver, _, init = job["solver"].partition("/")
    model = SNMF(job["k"], solver=solver, sparsity=job["sparsity"], init=init or "random", max_iter=job["iters"],
                 tol=0.0, patience=10**9, seed=job.get("seed", 0)).fit(X, progress=False)
    fit_seconds = time.perf_counter() - loaded
    history = np.asarray(model.loss_history_, np.float64)
    return {"fit_s": fit_seconds, "import_s": imported - started, "compile_s": float(sum(compiles)),
            "compiles": len(compiles), "cache_hits": len(hits),
            "rel_err": math.sqrt(float(history.min()) / sq_norm), "n_iter": int(model.n_iter_),
            "rel_err_history": (np.sqrt(np.minimum.accumulate(history) / sq_norm)).tolist() if job.get("history") else None,
            "cache_dir": jax.config.jax_compilation_cache_dir}


def run_child(job: dict, cache: str | os.PathLike | None) -> dict:
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["JSNMF_COMPILATION_CACHE"] = str(cache) if cache is not None else "off"
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"child {job} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def first_reaching(rel_err_history: list[float], target: float) -> int | None:
    reached = np.nonzero(np.asarray(rel_err_history) <= target)[0]
    return int(reached[0]) + 1 if reached.size else None


def timed_pair(job: dict, scratch: Path) -> tuple[dict, dict]:
    """A cold (empty cache folder) and a warm (same folder) fresh-process run of ``job``."""
    folder = Path(tempfile.mkdtemp(dir=scratch))
    cold = run_child(job, folder)
    warm = run_child(job, folder)
    return cold, warm


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def measure(noise: float, args, scratch: Path) -> str:
    from bench_snmf import gelu_activations

    n, d, k, sparsity = args.n, args.d, args.k, args.sparsity
    data = scratch / f"X-noise{noise}.npy"
    np.save(data, gelu_activations(n, d, k, noise=noise))
    base = {"data": str(data), "k": k, "sparsity": sparsity}
    print(f"noise {noise}: probes", flush=True)

    probes = {s: run_child({**base, "kind": "jsnmf", "solver": s, "iters": args.mu_iters if s == "mu" else args.probe_iters,
                            "history": True}, None) for s in args.solvers}
    paper_target = None
    mu_target = probes["mu"]["rel_err_history"][args.mu_iters - 1] if "mu" in probes else None
    # Iterations to a target depend on the start's seed: untimed probes at other seeds show the spread.
    seed_solvers = [s for s in args.seed_solvers.split(",") if s in probes]
    seed_probes = {(s, seed): run_child({**base, "kind": "jsnmf", "solver": s, "iters": args.seed_probe_iters,
                                         "history": True, "seed": seed}, None)
                   for s in seed_solvers for seed in range(1, args.seeds)}

    # Alternate the repeats of every configuration: (paper), then each solver per target.
    paper_runs, runs = [], {}
    for repeat in range(args.repeats):
        if not args.no_paper:
            result = run_child({**base, "kind": "paper", "iters": PAPER_ITERS}, None)
            paper_runs.append(result)
            print(f"  paper {PAPER_ITERS} it: {result['fit_s']:.2f} s, rel err {result['rel_err']:.4f}", flush=True)
            paper_target = statistics.median(r["rel_err"] for r in paper_runs)
        targets = {"paper": paper_target, "mu400": mu_target}
        for target_name, target in targets.items():
            if target is None:
                continue
            for solver in args.solvers:
                iters = first_reaching(probes[solver]["rel_err_history"], target)
                if target_name == "mu400" and solver == "mu":
                    iters = args.mu_iters
                if iters is None:
                    runs.setdefault((target_name, solver), None)
                    continue
                cold, warm = timed_pair({**base, "kind": "jsnmf", "solver": solver, "iters": iters}, scratch)
                assert cold["rel_err"] <= target * (1 + 1e-6), (solver, target_name, cold["rel_err"], target)
                runs.setdefault((target_name, solver), []).append((iters, cold, warm))
                print(f"  {target_name} {solver} {iters} it: cold {cold['fit_s']:.2f} s (compile {cold['compile_s']:.2f} s), "
                      f"warm {warm['fit_s']:.2f} s (compile {warm['compile_s']:.2f} s, {warm['cache_hits']} hits)",
                      flush=True)

    # -- the section
    lines = [f"### Time to an answer (`bench_time_to_answer.py`), n={n}, d={d}, k={k}, sparsity={sparsity}, "
             f"noise {noise}", ""]
    lines.append(f"Every figure is one `fit()` call in a fresh process (backend start, transfer, initialization, "
                 f"compilation and iterations; imports excluded), median of {args.repeats}. `cold`: empty "
                 "compilation-cache folder (compiles and writes it); `warm`: a second process on the same folder "
                 "(reads the executables back). Iterations to a target come from an untimed probe.")
    lines.append("")
    if paper_runs:
        paper_s = median(paper_runs, "fit_s")
        each = ", ".join(f"{r['fit_s']:.1f}" for r in paper_runs)
        lines.append(f"The paper's fit (its `NMFSemiNMF.fit` re-written in PyTorch from its description, "
                     f"{paper_runs[0]['threads']} torch threads), {PAPER_ITERS} iterations: **{paper_s:.2f} s** "
                     f"(runs: {each} s), relative error "
                     f"**{paper_target:.4f}**.")
        lines.append("")
    speed_rows = []
    for (target_name, solver), found in runs.items():
        label = {"paper": f"paper's error {paper_target:.4f}" if paper_target else "",
                 "mu400": f"`mu` × {args.mu_iters} error {mu_target:.4f}"}[target_name]
        if not found:
            probe_iters = args.mu_iters if solver == "mu" else args.probe_iters
            speed_rows.append([label, f"`{solver}`", f"not reached in {probe_iters}", "—", "—", "—", "—", "—"])
            continue
        iters = found[0][0]
        cold = [c for _, c, _ in found]
        warm = [w for _, _, w in found]
        cold_s, warm_s = median(cold, "fit_s"), median(warm, "fit_s")
        if target_name == "paper":
            reference, name = median(paper_runs, "fit_s"), "paper's fit"
            versus = f"{reference / cold_s:.1f}× / {reference / warm_s:.1f}×"
        else:
            mu_runs = runs.get(("mu400", "mu")) or []
            mu_cold = median([c for _, c, _ in mu_runs], "fit_s")
            mu_warm = median([w for _, _, w in mu_runs], "fit_s")
            versus = f"{mu_cold / cold_s:.1f}× / {mu_warm / warm_s:.1f}×"
        speed_rows.append([label, f"`{solver}`", iters, f"{cold_s:.2f}", f"{median(cold, 'compile_s'):.2f}",
                           f"{warm_s:.2f}", f"{median(warm, 'compile_s'):.2f} ({int(median(warm, 'cache_hits'))} hits)",
                           versus])
    lines.append(markdown_table(["target", "configuration", "iterations", "cold s", "cold compile s", "warm s",
                                 "warm compile s (cache hits)", "faster (cold / warm)"], speed_rows))
    lines.append("")
    lines.append(f"`faster`: against the paper's fit for its error, against {args.mu_iters} `mu` iterations (same state of "
                 "the cache) for theirs.")
    if args.seeds > 1 and seed_solvers:
        lines.append("")
        lines.append(f"Iterations to each target from the starts of seeds 0–{args.seeds - 1} (untimed probes; the "
                     "timed rows above use seed 0, as every row does):")
        lines.append("")
        seed_rows = []
        for solver in seed_solvers:
            histories = [probes[solver]["rel_err_history"]] + [seed_probes[(solver, seed)]["rel_err_history"]
                                                               for seed in range(1, args.seeds)]
            row = [f"`{solver}`"]
            for target in (paper_target, mu_target):
                if target is None:
                    continue
                counts = [first_reaching(h, target) for h in histories]
                shown = ", ".join("—" if c is None else str(c) for c in counts)
                reached = [c for c in counts if c is not None]
                row.append(f"{shown} (median {statistics.median(reached):g})" if len(reached) == len(counts)
                           else shown)
            seed_rows.append(row)
        headers = ["configuration"] + (["paper's error"] if paper_target else []) + [f"`mu` × {args.mu_iters} error"]
        lines.append(markdown_table(headers, seed_rows))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=3072)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--sparsity", type=float, default=0.01)
    parser.add_argument("--noise", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--mu-iters", type=int, default=400)
    parser.add_argument("--probe-iters", type=int, default=200,
                        help="most iterations a probe of a solver other than mu runs")
    parser.add_argument("--solvers", default=",".join(SOLVERS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=4, help="starts probed for the spread of iterations to a target")
    parser.add_argument("--seed-solvers", default="ehals,ehals/tokens", help="configurations probed at every seed")
    parser.add_argument("--seed-probe-iters", type=int, default=100, help="iterations of each probe at another seed")
    parser.add_argument("--no-paper", action="store_true")
    parser.add_argument("--label", default="cpu")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    args.solvers = args.solvers.split(",")
    with tempfile.TemporaryDirectory(prefix="jsnmf-tta-") as scratch:
        for noise in args.noise:
            text = measure(noise, args, Path(scratch))
            print("\n" + text + "\n", flush=True)
            if not args.no_write:
                write_section("bench_time_to_answer", args.label + ("" if noise == 1.0 else f"-noise{noise}"), text)


if __name__ == "__main__":
    main()

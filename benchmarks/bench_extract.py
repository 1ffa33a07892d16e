"""Benchmark: extraction throughput into the ActivationStore, and what the disk writes cost.

Builds a GPT-2-small-sized model with random weights (12 layers, d_model 768, d_mlp 3072; saved with
transformers to a temporary directory), a word-level tokenizer and a synthetic corpus, then times
``jsnmf.extract.extract`` capturing layers 0, 6 and 11:

- with the store written in float32 and in bfloat16;
- with the store writes replaced by discarding the arrays (same forward, host copy and gather).

For the store runs it also times the writer's calls in the main thread (``append``: dtype check,
finiteness check, buffering; ``close``) and the chunk commits (``.npy`` writes + fsync + manifest),
which run in the store's background thread. The slowdown ``1 - tokens/s(store) / tokens/s(discard)``
is the cost the pipeline does not hide. Another table measures the store alone (no model): the
tokens/s it can absorb, i.e. the ceiling the disk puts on extraction on a fast accelerator. The last
one is tokens/s against the number of devices of the data-parallel forward (meshes of 1, 2, 4, ...
devices, store writes discarded); ``--devices N`` on a CPU simulates N devices, which share the same
cores, so there it shows the mechanism and its overhead, not a speed-up. With ``--processes N`` a
further table times the whole ``extract`` call (store written) by 1 process and by N processes under
``jax.distributed`` on this machine (localhost coordinator, one device each, every process writing its
share of one store): the multi-process path's cost where the processes share the same cores.

Usage: python benchmarks/bench_extract.py [--lines 300] [--batch-size 16] [--max-length 128] [--repeats 2]
       [--devices 4] [--device-lines 60] [--processes 2]
Prints a markdown table. Needs no network; writes only under a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_model(directory: Path, vocab_words: int) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257,
                                     bos_token_id=2, eos_token_id=2, pad_token_id=1)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    vocab = {token: i for i, token in enumerate(["<unk>", "<pad>", "<bos>"] + [f"w{i}" for i in range(vocab_words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                         bos_token="<bos>", eos_token="<bos>").save_pretrained(directory)


def build_corpus(path: Path, lines: int, vocab_words: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(10, 90, lines)
    words = rng.zipf(1.3, size=lengths.sum()) % vocab_words
    texts, start = [], 0
    for n in lengths:
        texts.append(" ".join(f"w{w}" for w in words[start : start + n]))
        start += n
    path.write_text("\n".join(texts) + "\n")


def build_warmup_corpus(path: Path, batch_size: int, max_length: int, devices: int = 1) -> None:
    """``devices`` batches per padded length (8, 16, ..., max_length), so that batches dealt out in turn
    compile every shape the timed runs use on every device."""
    texts, n = [], 8
    while True:
        n = min(n, max_length)
        texts += ([" ".join(["w1"] * n)] + ["w2"] * (batch_size - 1)) * devices
        if n == max_length:
            break
        n *= 2
    path.write_text("\n".join(texts) + "\n")


class Timers:
    """Wraps functions to accumulate their wall time."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def wrap(self, owner, name: str, label: str):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, name, timed)
        try:
            yield
        finally:
            setattr(owner, name, original)


@contextlib.contextmanager
def discarding_writer():
    """Replace the store's append/close by counting: the arrays are dropped, nothing is written."""
    from jsnmf.store import StoreWriter

    originals = StoreWriter.append, StoreWriter.close

    def append(self, layer_acts, token_ids, *rest):
        self._n_buffered += len(token_ids)

    def close(self, meta=None):
        self.abort()
        return None

    StoreWriter.append, StoreWriter.close = append, close
    try:
        yield
    finally:
        StoreWriter.append, StoreWriter.close = originals


def run_once(model_dir, corpus, out_dir, layers, args, dtype, discard: bool, mesh=None) -> dict:
    import jsnmf.extract as extract_module
    from jsnmf.store import ActivationStore, StoreWriter

    timers = Timers()
    shutil.rmtree(out_dir, ignore_errors=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(timers.wrap(extract_module, "run_batches", "loop"))
        if discard:
            stack.enter_context(discarding_writer())
        else:
            stack.enter_context(timers.wrap(StoreWriter, "close", "close"))
            stack.enter_context(timers.wrap(StoreWriter, "append", "append"))
            stack.enter_context(timers.wrap(StoreWriter, "_write_chunk", "commit"))  # the commit thread
        t0 = time.perf_counter()
        extract_module.extract(model_dir, corpus, out_dir, layers=layers, max_length=args.max_length,
                               batch_size=args.batch_size, dtype=dtype, chunk_tokens=args.chunk_tokens,
                               resume=False, progress=False, mesh=mesh)
        total = time.perf_counter() - t0
    manifest = ActivationStore.open(out_dir, allow_incomplete=True).manifest
    written = sum(f.stat().st_size for f in Path(out_dir).rglob("*.npy")) if not discard else 0
    seconds = timers.seconds
    loop = seconds["loop"] + seconds.get("close", 0.0)  # the tail chunk is committed by close()
    writer = seconds.get("append", 0.0) + seconds.get("close", 0.0)
    return {"n_tokens": manifest["n_tokens_expected"], "total_s": total, "loop_s": loop, "writer_s": writer,
            "commit_s": seconds.get("commit", 0.0), "bytes": written, "chunks": len(manifest["chunks"])}


def store_capacity(root: Path, layers: list[int], d_mlp: int, chunk_tokens: int, n_tokens: int = 16384,
                   block: int = 1024) -> list[tuple[str, float, float]]:
    """Tokens/s and MiB/s the store alone absorbs (no model): append ``block``-token batches already in
    the store dtype (extract casts on the device), from create to close (all chunks fsynced)."""
    import ml_dtypes

    from jsnmf.store import ActivationStore

    rng = np.random.default_rng(0)
    x = rng.normal(size=(block, d_mlp)).astype(np.float32)
    zeros = np.zeros(block, np.int32)
    results = []
    for dtype, np_dtype in [("float32", np.float32), ("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)]:
        acts = {layer: x.astype(np_dtype) for layer in layers}
        out = root / f"capacity_{dtype}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        writer = ActivationStore.create(out, layers=layers, d_mlp=d_mlp, dtype=dtype, chunk_tokens=chunk_tokens)
        for _ in range(n_tokens // block):
            writer.append(acts, zeros, zeros, zeros, zeros)
        writer.close()
        seconds = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in out.rglob("*.npy"))
        results.append((dtype, n_tokens / seconds, size / 2**20 / seconds))
        shutil.rmtree(out, ignore_errors=True)
    return results


def device_scaling(model_dir, corpus, root: Path, layers, args) -> list[tuple[int, float]]:
    """Tokens/s of the batch loop (store writes discarded) on meshes of 1, 2, 4, ... devices; best of repeats."""
    import jax
    from jax.sharding import Mesh

    devices = np.array(jax.devices())
    counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= devices.size]
    results = []
    for n in counts:
        mesh = Mesh(devices[:n], ("data",))
        build_warmup_corpus(root / "warmup_devices.txt", args.batch_size, args.max_length, n)
        run_once(model_dir, root / "warmup_devices.txt", root / "store", layers, args, "float32", True, mesh)
        best = max(_rate(run_once(model_dir, corpus, root / "store", layers, args, "float32", True, mesh))
                   for _ in range(args.repeats))
        print(f"  {n} device(s): {best:.1f} tokens/s", flush=True)
        results.append((n, best))
    return results


def process_scaling(model_dir, corpus, root: Path, layers, args) -> list[tuple[int, float, float]]:
    """``(processes, seconds, tokens/s)`` of the whole ``extract`` call (store written, float32) by 1 and by
    ``args.processes`` processes, each a fresh run of this script (``--process-worker``); best of repeats."""
    import socket
    import subprocess

    build_warmup_corpus(root / "warmup.txt", args.batch_size, args.max_length)
    results = []
    for n in (1, args.processes):
        best = None
        for repeat in range(args.repeats):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            out = root / f"processes_{n}_{repeat}"
            command = [sys.executable, __file__, "--process-worker", str(model_dir), str(corpus), str(out), str(port),
                       str(n), "--layers", ",".join(map(str, layers)), "--batch-size", str(args.batch_size),
                       "--max-length", str(args.max_length), "--chunk-tokens", str(args.chunk_tokens)]
            env = dict(os.environ, JAX_PLATFORMS="cpu")
            workers = [subprocess.Popen([*command, str(i)], env=env) for i in range(n)]
            if any(w.wait() != 0 for w in workers):
                raise SystemExit(f"a --process-worker failed ({n} processes)")
            timing = json.loads((out / "timing.json").read_text())
            shutil.rmtree(out, ignore_errors=True)
            print(f"  {n} process(es), repeat {repeat}: {timing['seconds']:.2f} s", flush=True)
            if best is None or timing["seconds"] < best["seconds"]:
                best = timing
        results.append((n, best["seconds"], best["n_tokens"] / best["seconds"]))
    return results


def process_worker(argv: list[str]) -> None:
    """One process of :func:`process_scaling`: join the job, warm up (compile every shape), meet the others,
    time ``extract`` into the shared store, meet again; process 0 writes ``timing.json``."""
    parser = argparse.ArgumentParser()
    for name in ("model_dir", "corpus", "out", "port", "n_processes", "process_id"):
        parser.add_argument(name)
    for name in ("--layers", "--batch-size", "--max-length", "--chunk-tokens"):
        parser.add_argument(name)
    a = parser.parse_args(argv)
    n, rank = int(a.n_processes), int(a.process_id)
    import jax

    from jsnmf import distributed
    from jsnmf.extract import extract

    if n > 1:
        distributed.initialize(coordinator_address=f"127.0.0.1:{a.port}", num_processes=n, process_id=rank,
                               cpu_collectives="gloo")
    out = Path(a.out)
    settings = dict(layers=[int(x) for x in a.layers.split(",")], batch_size=int(a.batch_size),
                    max_length=int(a.max_length), chunk_tokens=int(a.chunk_tokens), dtype="float32", progress=False)
    extract(a.model_dir, out.parent / "warmup.txt", out / "warmup", **settings)
    with distributed.all_or_none("warming up"):  # a barrier: all start the clock together
        pass
    t0 = time.perf_counter()
    store = extract(a.model_dir, a.corpus, out / "store", **settings)
    with distributed.all_or_none("extracting"):
        pass
    seconds = time.perf_counter() - t0
    if jax.process_index() == 0:
        (out / "timing.json").write_text(json.dumps({"seconds": seconds, "n_tokens": store.n_tokens}))


def _rate(result: dict) -> float:
    return result["n_tokens"] / result["loop_s"]


def _simulate_devices(n: int) -> None:
    """Ask XLA for ``n`` CPU devices (before JAX starts; only the CPU platform honours it)."""
    if n > 1:
        flag = f"--xla_force_host_platform_device_count={n}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--chunk-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layers", default="0,6,11")
    parser.add_argument("--vocab-words", type=int, default=5000)
    parser.add_argument("--devices", type=int, default=1,
                        help="simulated CPU devices for the device table (default: the devices JAX sees)")
    parser.add_argument("--device-lines", type=int, default=128, help="documents of the device table's corpus")
    parser.add_argument("--processes", type=int, default=0,
                        help="also time extract by this many jax.distributed processes against 1 (0: skip)")
    parser.add_argument("--workdir", default=None, help="where to build the model and store (default: a temp dir)")
    if sys.argv[1:2] == ["--process-worker"]:
        return process_worker(sys.argv[2:])
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    _simulate_devices(args.devices)

    import jax

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_extract_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        model_dir, corpus = root / "model", root / "corpus.txt"
        if not (model_dir / "config.json").exists():
            build_model(model_dir, args.vocab_words)
        build_corpus(corpus, args.lines, args.vocab_words)
        build_warmup_corpus(root / "warmup.txt", args.batch_size, args.max_length)
        run_once(model_dir, root / "warmup.txt", root / "store", layers, args, "float32", discard=True)
        # Alternate the variants (the machine may be shared: repeats show the noise); keep each one's best.
        variants = [("store, float32", "float32", False), ("store, bfloat16", "bfloat16", False),
                    ("discard (no store)", "float32", True)]
        best: dict[str, dict] = {}
        for repeat in range(args.repeats):
            for label, dtype, discard in variants:
                r = run_once(model_dir, corpus, root / "store", layers, args, dtype, discard)
                print(f"  repeat {repeat}: {label}: {r['n_tokens'] / r['loop_s']:.1f} tokens/s", flush=True)
                if label not in best or r["loop_s"] < best[label]["loop_s"]:
                    best[label] = r
        rows = [(label, best[label]) for label, _, _ in variants]
        capacity = store_capacity(root, layers, 3072, args.chunk_tokens)
        build_corpus(root / "device_corpus.txt", args.device_lines, args.vocab_words, seed=1)
        scaling = device_scaling(model_dir, root / "device_corpus.txt", root, layers, args)
        processes = process_scaling(model_dir, root / "device_corpus.txt", root, layers, args) if args.processes else []
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)

    baseline = rows[-1][1]["n_tokens"] / rows[-1][1]["loop_s"]
    first = rows[0][1]
    print(f"\nExtraction into the ActivationStore: GPT-2-small-sized random model (12 layers, d_mlp 3072), "
          f"layers {layers}, {first['n_tokens']} tokens ({args.lines} documents), batch {args.batch_size}, "
          f"max_length {args.max_length}, chunks of {args.chunk_tokens} tokens ({first['chunks']} chunks); "
          f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPU cores); "
          f"best of {args.repeats}.\n")
    print("| run | tokens/s (batch loop) | tokens/s (end to end) | written (commit rate) | writer time (append + close) "
          "| chunk commits (background thread) | slowdown vs discard |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in rows:
        rate = r["n_tokens"] / r["loop_s"]
        is_store = not label.startswith("discard")
        slowdown = f"{100 * (1 - rate / baseline):.1f}%" if is_store else "—"
        writer = f"{r['writer_s']:.2f} s ({100 * r['writer_s'] / r['loop_s']:.1f}%)" if is_store else "—"
        commit = f"{r['commit_s']:.2f} s ({100 * r['commit_s'] / r['loop_s']:.1f}%)" if is_store else "—"
        written = f"{r['bytes'] / 2**20:.0f} MiB ({r['bytes'] / 2**20 / r['commit_s']:.0f} MiB/s)" if is_store else "—"
        print(f"| {label} | {rate:,.1f} | {r['n_tokens'] / r['total_s']:,.1f} | {written} | {writer} | {commit} "
              f"| {slowdown} |")
    print("\nStore alone (no model; batches of 1024 tokens already in the store dtype; create to close, fsync"
          f" included), {len(layers)} layers x 3072:\n")
    print("| store dtype | tokens/s | MiB/s |")
    print("|---|---:|---:|")
    for dtype, tokens_per_s, mib_per_s in capacity:
        print(f"| {dtype} | {tokens_per_s:,.0f} | {mib_per_s:,.0f} |")
    print(f"\nData-parallel forward ({args.device_lines} documents, store writes discarded, whole batches of {args.batch_size}"
          f" dealt out to the devices in turn; {jax.devices()[0].platform}, {jax.device_count()} devices"
          f"{' simulated on ' + str(os.cpu_count()) + ' CPU cores: no speed-up possible' if args.devices > 1 else ''}):\n")
    print("| devices | tokens/s (batch loop) | vs 1 device |")
    print("|---:|---:|---:|")
    for n, rate in scaling:
        print(f"| {n} | {rate:,.1f} | {rate / scaling[0][1]:.2f}x |")
    if processes:
        print(f"\nWhole `extract` call ({args.device_lines} documents, store written in float32) by 1 process and by "
              f"{args.processes} `jax.distributed` processes on this machine ({os.cpu_count()} CPU cores; each process "
              "one device; warmed up, then started together):\n")
        print("| processes | seconds | tokens/s | vs 1 process |")
        print("|---:|---:|---:|---:|")
        for n, seconds, rate in processes:
            print(f"| {n} | {seconds:.2f} | {rate:,.1f} | {rate / processes[0][2]:.2f}x |")
    print("\nBatch loop: forward, host copy, gather of real tokens, store writes (incl. the final commit). End to end"
          " adds corpus reading, model loading and tokenization. Writer time: the store's calls in the main"
          " thread (dtype conversion, finiteness check, buffering, waiting for the last commit); chunk commits"
          " (.npy writes + fsync + manifest) run in the store's background thread while the next batches compute."
          " The slowdown vs discarding the arrays is what the store really costs, when the machine is quiet.")


if __name__ == "__main__":
    main()

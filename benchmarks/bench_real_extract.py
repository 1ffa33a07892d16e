"""Benchmark: extraction throughput on the real pretrained models, against transformers/PyTorch.

For SmolLM2-135M and Gemma-3-270M (GGUF files from ``python -m jsnmf.models.fetch``), times
``jsnmf.extract.extract`` (the jitted forward up to the deepest requested layer, capture of the MLP
activations, host copy, and the store's writes, fsync included) and, as the peer, transformers'
PyTorch model loaded from the same GGUF file running the *same padded batches* (jsnmf's own batch
plan) with forward hooks on the same layers, stopping after the deepest one, and copying the kept
tokens' activations to NumPy (no store). Both in float32 on the CPU. Runs are interleaved
(jsnmf, torch, jsnmf, torch, ...) after one warm-up each (compilation), and medians are reported
with the ratio jsnmf / torch of each pair.

Usage: python benchmarks/bench_real_extract.py [--corpus PATH] [--layers 0,15,29] [--repeats 3]
The default corpus is the paper's 20-concept set when ../shared/data is there, else the demo corpus
shipped in the package. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def default_corpus() -> Path:
    paper = Path(__file__).resolve().parents[2] / "shared" / "data" / "paper_20_concepts.json"
    if paper.is_file():
        return paper
    import jsnmf

    return Path(jsnmf.__file__).parent / "data" / "demo_corpus.jsonl"


class _Stop(Exception):
    """Raised by the hook on the deepest requested layer: the rest of the forward is not needed."""


def torch_peer(path: Path, batches, layers: list[int]):
    """A callable running the batches through transformers' model; returns the tokens it kept."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    torch.set_num_threads(os.cpu_count() or 1)
    captured = {}
    last = max(layers)

    def hook(layer):
        def pre_hook(_, args):
            captured[layer] = args[0]
            if layer == last:
                raise _Stop
        return pre_hook

    for layer in layers:
        model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(hook(layer))

    def run() -> int:
        kept = 0
        with torch.no_grad():
            for batch in batches:
                try:
                    model(input_ids=torch.from_numpy(batch.input_ids.astype(np.int64)),
                          attention_mask=torch.from_numpy(batch.attention_mask.astype(np.int64)))
                except _Stop:
                    pass
                rows, cols = torch.from_numpy(batch.rows.astype(np.int64)), torch.from_numpy(batch.cols.astype(np.int64))
                for layer in layers:
                    np.ascontiguousarray(captured[layer][rows, cols].numpy())
                kept += len(batch.rows)
        return kept

    return run


def plan_batches(path: Path, corpus: Path, max_length: int, batch_size: int):
    """jsnmf's own batches for this corpus (the same padding buckets extract uses)."""
    from jsnmf.batches import bos_policy, make_batch, plan_tokens
    from jsnmf.corpus import read_corpus
    from jsnmf.models import load_tokenizer
    from jsnmf.models.gguf import GGUFCheckpoint
    from jsnmf.models.config import config_from_dict

    tokenizer = load_tokenizer(path)
    config = config_from_dict(GGUFCheckpoint(path).config)
    bos = bos_policy(tokenizer, config, None)
    plan = plan_tokens(read_corpus(corpus), tokenizer, bos, max_length, batch_size, True)
    longest = max(len(s) for s in plan.sequences)
    return [make_batch(plan, b, 0, longest) for b in range(plan.n_batches)], plan.n_tokens


def jsnmf_run(path: Path, corpus: Path, layers, args, out: Path):
    """Loop seconds of one extraction (model loading excluded, as for the peer)."""
    import jsnmf.extract as ex

    seconds = {}
    original = ex.run_batches

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            seconds["loop"] = time.perf_counter() - t0

    ex.run_batches = timed
    try:
        t0 = time.perf_counter()
        store = ex.extract(path, corpus, out, layers=layers, max_length=args.max_length, batch_size=args.batch_size,
                           resume=False, progress=False)
        close = time.perf_counter() - t0
    finally:
        ex.run_batches = original
    return store.manifest["n_tokens_expected"], seconds["loop"], close


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=None)
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--layers", default=None, help="default: first, middle and last layer")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import jax
    import torch
    import transformers

    from jsnmf.models import fetch

    corpus = args.corpus or default_corpus()
    rows = []
    for name in args.models.split(","):
        path = fetch.fetch(name, progress=False)
        from jsnmf.models.gguf import GGUFCheckpoint

        n_layers = GGUFCheckpoint(path).config.get("num_hidden_layers")
        layers = ([int(x) for x in args.layers.split(",")] if args.layers
                  else sorted({0, n_layers // 2, n_layers - 1}))
        batches, n_tokens = plan_batches(path, corpus, args.max_length, args.batch_size)
        peer = torch_peer(path, batches, layers)
        scratch = Path(tempfile.mkdtemp(prefix="bench_real_"))
        try:
            jsnmf_run(path, corpus, layers, args, scratch / "warm")  # compiles every bucket
            peer()
            ours, theirs = [], []
            for i in range(args.repeats):
                n, loop, _ = jsnmf_run(path, corpus, layers, args, scratch / f"run{i}")
                assert n == n_tokens, (n, n_tokens)
                ours.append(n / loop)
                t0 = time.perf_counter()
                kept = peer()
                theirs.append(kept / (time.perf_counter() - t0))
                assert kept == n_tokens, (kept, n_tokens)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        ratios = [a / b for a, b in zip(ours, theirs)]
        rows.append((name, layers, n_tokens, statistics.median(ours), statistics.median(theirs),
                     statistics.median(ratios), min(ratios), max(ratios)))

    print(f"\n{platform.machine()} CPU, {os.cpu_count()} cores; jax {jax.__version__}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {date.today()}; corpus {corpus.name}; "
          f"batch {args.batch_size}, max length {args.max_length}; float32; medians of {args.repeats} interleaved runs\n")
    print("| model | layers | tokens | jsnmf extract → store, tok/s | transformers/torch forward + hooks, tok/s "
          "| ratio (median, min–max) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, layers, n, ours, theirs, ratio, low, high in rows:
        print(f"| {name} | {','.join(map(str, layers))} | {n:,} | {ours:,.0f} | {theirs:,.0f} "
              f"| {ratio:.2f}× ({low:.2f}–{high:.2f}) |")


if __name__ == "__main__":
    main()

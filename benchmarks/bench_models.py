"""Benchmark: forward throughput of the jsnmf model port with MLP-activation capture, against
transformers (PyTorch, CPU) capturing the same activations with forward pre-hooks.

A GPT-2-small-sized model (12 layers, d_model 768, d_mlp 3072, vocab 50257) with random weights is
built with transformers, saved to a temporary directory and loaded with ``jsnmf.models.load``; both
implementations then run the same (batch, seq) token batches:

- ``jsnmf`` — ``model(ids, attention_mask, capture=layers)``: logits and the captured activations;
- ``jsnmf (no logits)`` — the same with ``stop_at_layer=n_layers`` (extraction skips the unembedding);
- ``torch`` — ``torch.inference_mode()`` forward with pre-hooks on every captured ``mlp.c_proj``.

Reported: median seconds per forward over ``--repeats`` after ``--warmup``, tokens/s, achieved
TFLOP/s (≈ 2 · matmul parameters · tokens; matmul parameters include the unembedding when logits are
computed, not the embedding lookups), and the ratio to torch. JAX uses the GPU when it sees one
(torch stays on the CPU; ``--no-torch`` skips it). Prints a markdown table; ``--out FILE`` also
writes it as a section of FILE (atomically; re-runs replace their own section).

    python benchmarks/bench_models.py                                  # GPT-2 small, batch 8, seq 128
    python benchmarks/bench_models.py --batch 32 --seq 512 --no-torch --device-label h100
    python benchmarks/bench_models.py --family llama --layers 16 --d-model 2048 --d-mlp 8192 --heads 32 --kv-heads 8 --no-torch
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from common import default_label, machine_description, markdown_table, write_section  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--d-mlp", type=int, default=None, help="default 4·d_model")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=None, help="llama only; default = heads")
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--capture", default="all", help="'all', 'none', or comma-separated layer indices")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="jsnmf dtype (torch stays float32)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--device-label", default=None, help="label of the machine in the table / section")
    p.add_argument("--out", type=Path, default=None, help="markdown file to write the table section into")
    args = p.parse_args(argv)
    for name in ("layers", "d_model", "heads", "vocab", "batch", "seq", "repeats"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.d_model % args.heads:
        p.error("--d-model must be divisible by --heads")
    return args


def build_checkpoint(args, directory: Path):
    """Random-weight transformers model saved to ``directory``; returns the torch model (float32, CPU)."""
    import torch
    import transformers

    torch.manual_seed(0)
    d_mlp = args.d_mlp or 4 * args.d_model
    if args.family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=args.layers, n_embd=args.d_model, n_inner=d_mlp, n_head=args.heads,
                                      n_positions=max(1024, args.seq), vocab_size=args.vocab)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(num_hidden_layers=args.layers, hidden_size=args.d_model, intermediate_size=d_mlp,
                                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
                                       vocab_size=args.vocab, max_position_embeddings=max(2048, args.seq),
                                       tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    model.eval()
    model.save_pretrained(directory)
    return model


def capture_layers(spec: str, n_layers: int) -> list[int]:
    if spec == "all":
        return list(range(n_layers))
    if spec == "none":
        return []
    layers = sorted({int(s) for s in spec.split(",")})
    if layers and not 0 <= layers[0] <= layers[-1] < n_layers:
        raise SystemExit(f"--capture layers must be in [0, {n_layers})")
    return layers


def matmul_params(cfg, with_unembedding: bool) -> int:
    """Weights used in matrix products per token (embedding lookups excluded)."""
    d, f, hd = cfg.d_model, cfg.d_mlp, cfg.head_dim
    attn = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = (2 if cfg.model_type == "gpt2" else 3) * d * f
    return cfg.n_layers * (attn + mlp) + (cfg.vocab_size * d if with_unembedding else 0)


def jsnmf_runner(model, ids, mask, layers, logits: bool):
    """A callable running one blocking jsnmf forward."""
    import jax

    stop = None if logits else model.config.n_layers

    def run():
        out = model(ids, attention_mask=mask, capture=layers, stop_at_layer=stop)
        jax.block_until_ready((out.logits, out.mlp_activations))

    return run


def torch_runner(hf, ids, mask, layers, family: str):
    """A callable running one torch forward whose pre-hooks keep the same MLP activations."""
    import torch

    captured = {}
    blocks = hf.transformer.h if family == "gpt2" else hf.model.layers
    for layer in layers:
        module = blocks[layer].mlp.c_proj if family == "gpt2" else blocks[layer].mlp.down_proj
        module.register_forward_pre_hook(lambda m, a, layer=layer: captured.__setitem__(layer, a[0]))
    t_ids, t_mask = torch.as_tensor(ids), torch.as_tensor(mask)

    def run():
        with torch.inference_mode():
            hf(input_ids=t_ids, attention_mask=t_mask, use_cache=False)

    return run


def interleaved_medians(runners: dict, repeats: int, warmup: int) -> dict:
    """Median seconds per runner; the runners alternate within each repeat, so a change in machine
    load during the run affects all of them alike."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> str:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    import jsnmf.models as jm

    label = args.device_label or default_label()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, size=(args.batch, args.seq)).astype(np.int64)
    mask = np.ones_like(ids)
    tokens = args.batch * args.seq

    with tempfile.TemporaryDirectory(prefix="jsnmf-bench-models-") as tmp:
        t0 = time.perf_counter()
        hf = build_checkpoint(args, Path(tmp))
        model, _ = jm.load(tmp, dtype=getattr(jnp, args.dtype), tokenizer=False)
        print(f"built and loaded the checkpoint in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    cfg = model.config
    layers = capture_layers(args.capture, cfg.n_layers)
    ids_j, mask_j = jax.device_put(ids.astype(np.int32)), jax.device_put(mask.astype(np.int32))

    runners = {
        "jsnmf": jsnmf_runner(model, ids_j, mask_j, layers, logits=True),
        "jsnmf (no logits)": jsnmf_runner(model, ids_j, mask_j, layers, logits=False),
    }
    if not args.no_torch:
        import torch

        runners["torch"] = torch_runner(hf, ids, mask, layers, args.family)
        torch_threads = torch.get_num_threads()
    seconds_by_name = interleaved_medians(runners, args.repeats, args.warmup)
    results = {name: (sec, name != "jsnmf (no logits)") for name, sec in seconds_by_name.items()}
    rows = []
    torch_s = results.get("torch", (None,))[0]
    jax_device = jax.devices()[0]
    for name, (seconds, with_logits) in results.items():
        device = "cpu" if name == "torch" else f"{jax_device.platform}"
        dtype = "float32" if name == "torch" else args.dtype
        flops = 2 * matmul_params(cfg, with_logits) * tokens
        ratio = f"{torch_s / seconds:.2f}×" if torch_s else "—"
        rows.append([label, name, device, dtype, f"{args.batch}×{args.seq}", len(layers), f"{seconds * 1e3:.1f}",
                     f"{tokens / seconds:,.0f}", f"{flops / seconds / 1e12:.3f}", ratio])
    header = ["machine", "implementation", "device", "dtype", "batch×seq", "layers captured", "ms / forward",
              "tokens/s", "TFLOP/s", "speed vs torch"]
    size = f"{cfg.model_type} {cfg.n_layers} layers, d_model {cfg.d_model}, d_mlp {cfg.d_mlp}, vocab {cfg.vocab_size}"
    notes = (f"Model: {size} (random weights). Median of {args.repeats} forwards after {args.warmup} warm-up; "
             "the implementations alternate within each repeat.")
    if not args.no_torch:
        notes += f" torch threads: {torch_threads}."
    body = "### Model forward with MLP-activation capture\n\n" + notes + "\n\n" + markdown_table(header, rows)
    print(body)
    print(f"\n{machine_description()}")
    if args.out is not None:
        write_section("bench_models", label, body, path=args.out)
    return body


if __name__ == "__main__":
    main()

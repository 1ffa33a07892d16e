"""GGUF files (llama.cpp's format) read as Hugging Face checkpoints, against transformers.

The files are written by ``tiny_gguf`` the way llama.cpp's converter writes them (its names, Llama's
rotary permutation of Q/K, Gemma's ``1 + w`` norms, GPT-2's transposed Conv1D weights, its metadata
keys), from tiny random transformers models; everything is offline and small.
"""
import dataclasses
import os
import re
import shutil
import threading
import time

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from gguf import GGMLQuantizationType as Q

import jsnmf.models as jm
import tiny_gguf as tg
import tiny_models as tm
from jsnmf.models import gguf as jgguf
from jsnmf.models.config import config_from_dict
from jsnmf.models.gguf import GGUFCheckpoint, is_gguf

ATOL = 1e-4  # the parity tolerance of test_models_parity.py
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(autouse=True)
def _private_tokenizer_cache(tmp_path, monkeypatch):
    """The converted GGUF tokenizers go to a per-test folder, not the user's cache."""
    monkeypatch.setenv("JSNMF_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory):
    """kind → (path, Converted) of its F32 GGUF file, written once per module."""
    directory = tmp_path_factory.mktemp("gguf-f32")
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = tg.gguf_file(kind, directory)
        return cache[kind]

    return get


def _logit_error(model, hf_model, seed=1):
    """Max |logits - transformers' logits| over the valid positions of a left-padded batch."""
    ids, mask = tm.padded_batch(seed=seed, side="left")
    ref, _ = tm.torch_forward(hf_model, ids, mask)
    assert np.abs(ref).max() > 0.5  # the comparison is not vacuous
    ours = np.asarray(model(ids, attention_mask=mask).logits, np.float64)
    valid = mask.astype(bool)
    return float(np.abs(ours[valid] - ref[valid]).max())


def _parameter(model, hf_name):
    """The port's parameter filled from the checkpoint tensor ``hf_name``."""
    family, cfg = type(model), model.config
    path = family.checkpoint_names(cfg)[family.canonical_name(hf_name, cfg)]
    _, state = nnx.split(model)
    return np.asarray(dict(nnx.to_flat_state(state))[path].get_value())


# ---- F32 files: names, un-permutation, norm shift, transposes, config ----------------------------


@pytest.mark.parametrize("kind", tg.KINDS)
def test_f32_gguf_matches_transformers(kind, f32_file):
    """llama (untied; tied with linear RoPE), Gemma 1, Gemma 2 (soft-caps, sliding window), Gemma 3
    (query/key norms, 5 sliding + 1 full layer, linear RoPE on the global layers) and GPT-2: the
    config read from the metadata is the transformers config's, and the logits match."""
    path, converted = f32_file(kind)
    model = jm.load_model(path)
    expected = config_from_dict(converted.hf_model.config.to_dict())
    # GGUF stores the epsilon as float32 (1e-5 → 9.99999975e-06); every other field is exact
    assert model.config.norm_eps == pytest.approx(expected.norm_eps, rel=1e-6)
    assert dataclasses.replace(model.config, norm_eps=expected.norm_eps) == expected
    assert _logit_error(model, converted.hf_model) < ATOL


def test_llama_without_unpermuting_qk_differs(f32_file, monkeypatch):
    """The Q/K un-permutation is needed: skipped, the shapes still fit but the logits are wrong."""
    path, converted = f32_file("llama")
    monkeypatch.setattr(jgguf, "unpermute_rotary", lambda weight, n_heads: weight)
    assert _logit_error(jm.load_model(path), converted.hf_model) > 0.05


@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3"])
def test_gemma_without_norm_shift_differs(kind, f32_file, monkeypatch):
    """The ``1 + w`` → ``w`` shift is needed: skipped, the port scales by ``2 + w`` and the logits differ."""
    path, converted = f32_file(kind)
    family = jgguf.FAMILIES[converted.arch]
    monkeypatch.setitem(jgguf.FAMILIES, converted.arch, dataclasses.replace(family, norm_stored_plus_one=False))
    assert _logit_error(jm.load_model(path), converted.hf_model) > 0.05


def test_gpt2_without_transposes_is_a_shape_error(f32_file, monkeypatch):
    path, _ = f32_file("gpt2")
    monkeypatch.setitem(jgguf.FAMILIES, "gpt2", dataclasses.replace(jgguf.FAMILIES["gpt2"], transposed=()))
    with pytest.raises(ValueError, match=rf"{path}: tensor 'blk\.0\.attn_qkv\.weight' has shape \(192, 64\), expected \(64, 192\)"):
        jm.load_model(path)


def _rope_half(x, pos, theta):
    """transformers: rotate the halves (x[i], x[i + hd/2]) by pos·θ_i."""
    half = x.shape[-1] // 2
    angle = pos[:, None] * theta ** (-np.arange(half) / half)
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)], -1)


def _rope_interleaved(x, pos, theta):
    """llama.cpp's rope for the llama architecture: rotate the pairs (x[2i], x[2i + 1]) by pos·θ_i."""
    half = x.shape[-1] // 2
    angle = pos[:, None] * theta ** (-np.arange(half) / half)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)
    return out


def test_the_permutation_is_the_one_llama_cpp_computes_with():
    """The file layout is llama.cpp's: attention scores from the permuted Q/K weights with llama.cpp's
    interleaved rope equal transformers' with the split-halves rope (GQA: K with the KV head count),
    and the loader's ``unpermute_rotary`` inverts the permutation exactly."""
    rng = np.random.default_rng(0)
    n_heads, n_kv, head_dim, d_model, seq, theta = 4, 2, 16, 24, 7, 100.0
    wq, wk = rng.normal(size=(n_heads * head_dim, d_model)), rng.normal(size=(n_kv * head_dim, d_model))
    x, pos = rng.normal(size=(seq, d_model)), np.arange(seq, dtype=np.float64)

    def scores(wq, wk, rope):
        q = rope((x @ wq.T).reshape(seq, n_heads, head_dim).swapaxes(0, 1), pos, theta)
        k = rope((x @ wk.T).reshape(seq, n_kv, head_dim).swapaxes(0, 1), pos, theta)
        return np.einsum("hqd,hkd->hqk", q, np.repeat(k, n_heads // n_kv, axis=0))

    hf = scores(wq, wk, _rope_half)
    llama_cpp = scores(tg.permute_rotary(wq, n_heads), tg.permute_rotary(wk, n_kv), _rope_interleaved)
    np.testing.assert_allclose(llama_cpp, hf, rtol=1e-10, atol=1e-10)
    assert not np.allclose(scores(wq, wk, _rope_interleaved), hf)  # the layouts do differ
    for w, heads in ((wq, n_heads), (wk, n_kv)):
        np.testing.assert_array_equal(jgguf.unpermute_rotary(tg.permute_rotary(w, heads), heads), w)


# ---- quantized tensors ---------------------------------------------------------------------------

# Every storage type gguf can write (F16, BF16 and the block types it quantizes in NumPy), and three
# K-quants (random blocks: gguf de-quantizes them but cannot quantize) on rows of 256. 1-D norms too.
QTYPES = {
    "llama": {
        "token_embd.weight": Q.Q8_0, "output.weight": Q.F16,
        "blk.0.attn_norm.weight": Q.F16, "blk.0.ffn_norm.weight": Q.BF16,
        "blk.0.attn_q.weight": Q.Q4_0, "blk.0.attn_k.weight": Q.Q4_1, "blk.0.attn_v.weight": Q.Q5_0,
        "blk.0.attn_output.weight": Q.Q5_1, "blk.0.ffn_gate.weight": Q.Q8_0, "blk.0.ffn_up.weight": Q.BF16,
        "blk.0.ffn_down.weight": Q.Q4_K,
        "blk.1.attn_q.weight": Q.BF16, "blk.1.attn_k.weight": Q.F16, "blk.1.attn_v.weight": Q.Q8_0,
        "blk.1.attn_output.weight": Q.Q4_0, "blk.1.ffn_gate.weight": Q.Q5_0, "blk.1.ffn_up.weight": Q.Q4_1,
        "blk.1.ffn_down.weight": Q.Q6_K,
        "blk.2.attn_q.weight": Q.Q8_0, "blk.2.attn_k.weight": Q.Q5_1, "blk.2.ffn_down.weight": Q.Q5_K,
    },
    # Gemma: norms stored as 1 + w in reduced precision, then shifted back
    "gemma2": {
        "token_embd.weight": Q.Q8_0, "output_norm.weight": Q.BF16,
        "blk.0.attn_norm.weight": Q.BF16, "blk.0.post_attention_norm.weight": Q.F16,
        "blk.0.ffn_norm.weight": Q.Q8_0, "blk.0.post_ffw_norm.weight": Q.BF16,
        "blk.0.attn_q.weight": Q.Q4_0, "blk.0.attn_k.weight": Q.Q5_0, "blk.0.ffn_down.weight": Q.Q4_1,
        "blk.1.attn_v.weight": Q.BF16, "blk.1.ffn_up.weight": Q.Q8_0, "blk.2.attn_output.weight": Q.F16,
    },
    "gemma3": {
        "blk.0.attn_q_norm.weight": Q.BF16, "blk.0.attn_k_norm.weight": Q.F16, "blk.5.ffn_norm.weight": Q.BF16,
        "blk.1.attn_q.weight": Q.Q8_0, "blk.5.ffn_gate.weight": Q.Q4_0,
    },
    # GPT-2: quantized in the transposed [out, in] layout; the tied output copy quantized like token_embd
    "gpt2": {
        "token_embd.weight": Q.Q8_0, "output.weight": Q.Q8_0, "position_embd.weight": Q.F16,
        "blk.0.attn_qkv.weight": Q.Q8_0, "blk.0.attn_output.weight": Q.Q4_0, "blk.0.ffn_up.weight": Q.BF16,
        "blk.0.ffn_down.weight": Q.Q4_K, "blk.1.ffn_down.weight": Q.Q6_K, "blk.2.attn_qkv.weight": Q.Q5_1,
        "blk.1.attn_norm.weight": Q.F16, "blk.1.attn_norm.bias": Q.BF16,
    },
}


@pytest.fixture(scope="module")
def quantized_file(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gguf-quantized")
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = tg.gguf_file(kind, directory, qtypes=QTYPES[kind])
        return cache[kind]

    return get


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", list(QTYPES))
def test_quantized_tensors_load_as_dequantized(kind, dtype, quantized_file):
    """Each tensor the loader reads, and the port's parameter filled from it, equals
    ``gguf.quants.dequantize`` of the stored data, reshaped and mapped back to the Hugging Face layout
    (un-permuted, shifted by -1 in float32, transposed), then rounded once to ``dtype``."""
    path, converted = quantized_file(kind)
    reader = gguf.GGUFReader(path)
    stored_types = {t.name: Q(t.tensor_type) for t in reader.tensors}
    assert {n: stored_types[n] for n in QTYPES[kind]} == QTYPES[kind]  # the file really holds these types
    stored = tg.stored_values(path)
    checkpoint = GGUFCheckpoint(path)
    by_hf_name = {checkpoint.hf_name(name): name for name in stored}
    model = jm.load_model(path, dtype=dtype)
    np_dtype = DTYPES[dtype]
    for tensor in checkpoint.tensors():
        name = by_hf_name[tensor.name]
        expected = tg.from_gguf_layout(converted.hf_model, converted.hf_names[name], stored[name]).astype(np_dtype)
        got = tensor.read(np_dtype)
        assert got.dtype == np_dtype and got.shape == expected.shape == tensor.shape, name
        np.testing.assert_array_equal(got.astype(np.float32), expected.astype(np.float32), err_msg=name)
        if tensor.name != "lm_head.weight" or not model.config.tie_word_embeddings:
            np.testing.assert_array_equal(_parameter(model, tensor.name).astype(np.float32),
                                          expected.astype(np.float32), err_msg=name)


@pytest.mark.parametrize("kind", list(QTYPES))
def test_quantized_gguf_matches_transformers_with_the_dequantized_weights(kind, quantized_file):
    """transformers given the de-quantized weights gives the port's logits (float32); and the
    quantization did change them (the check is not the F32 one again)."""
    path, converted = quantized_file(kind)
    reference = tg.reference_from_file(converted, path)
    model = jm.load_model(path)
    assert _logit_error(model, reference) < ATOL
    assert _logit_error(model, converted.hf_model) > 1e-3


def test_bfloat16_gemma_norms_are_rounded_once(quantized_file):
    """Gemma's stored ``1 + w`` is shifted in float32 and rounded to bfloat16 once: rounding ``1 + w``
    to bfloat16 first would keep only ~2^-8 absolute precision of ``w`` (here: errors of 1e-3 and more)."""
    path, converted = quantized_file("gemma2")
    stored = tg.stored_values(path)["blk.1.attn_norm.weight"]  # stored in F32
    checkpoint = GGUFCheckpoint(path)
    tensor = next(t for t in checkpoint.tensors() if t.name == "model.layers.1.input_layernorm.weight")
    got = tensor.read(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(got, (stored - 1).astype(ml_dtypes.bfloat16).astype(np.float32))
    double_rounded = (stored.astype(ml_dtypes.bfloat16).astype(np.float32) - 1).astype(ml_dtypes.bfloat16)
    assert np.abs(double_rounded.astype(np.float32) - (stored - 1)).max() > 1e-3


# ---- tokenizer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gpt2"])
def test_load_returns_the_tokenizer_in_the_metadata(kind, f32_file, tmp_path):
    """``load`` converts the vocabulary (sentencepiece-style for Llama/Gemma, byte-level BPE for
    GPT-2) with transformers, caches the conversion under ``JSNMF_CACHE``, and reuses it."""
    path, _ = f32_file(kind)
    model, tok = jm.load(path)
    cfg = model.config
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (1, (2,), 0)
    text = " " + " ".join(tg.word(n) for n in (12, 3, 110))
    vocab = tg.vocabulary("\u0120" if kind == "gpt2" else "\u2581")
    expected = [vocab.index(piece) for piece in vocab if piece[1:] in text.split()]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert sorted(ids) == sorted(expected) and len(ids) == 3
    assert tok.decode(ids).strip() == text.strip()
    cached = list((tmp_path / "cache" / "gguf-tokenizers").iterdir())
    assert len(cached) == 1 and (cached[0] / "tokenizer_config.json").is_file()
    assert jm.load_tokenizer(path)(text, add_special_tokens=False)["input_ids"] == ids  # from the cache
    assert jm.load(path, tokenizer=False)[1] is None


# ---- errors --------------------------------------------------------------------------------------


def _raises(path, call, match, types=(ValueError,)):
    """``call()`` raises exactly one of ``types`` (not a subclass such as KeyError/IndexError), with a
    message that names ``path`` and matches ``match``."""
    with pytest.raises(Exception) as info:
        call()
    assert type(info.value) in types, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert str(path) in message, message
    assert re.search(match, message), message
    return message


def test_unknown_architecture(tmp_path):
    """(``load_tokenizer`` alone still reads such a file's vocabulary: the tokenizer does not need the port.)"""
    path, _ = tg.gguf_file("llama", tmp_path, arch="mamba")
    for call in (lambda: jm.load_model(path), lambda: jm.load(path)):
        _raises(path, call, r"unsupported GGUF architecture 'mamba'; supported: llama, gemma, gemma2, gemma3, gpt2")


def test_quantization_type_gguf_cannot_dequantize(tmp_path):
    """Q8_1 (llama.cpp's activation type) has no de-quantizer in gguf: the error names the tensor and type."""
    converted = tg.convert(tg.reference("llama"))
    shape = converted.tensors["blk.1.ffn_up.weight"].shape
    data = np.zeros(gguf.quant_shape_to_byte_shape(shape, Q.Q8_1), np.uint8)
    path = tg.write(tmp_path / "q8_1.gguf", converted, raw={"blk.1.ffn_up.weight": (data, Q.Q8_1)})
    _raises(path, lambda: jm.load_model(path), r"tensor 'blk\.1\.ffn_up\.weight' uses quantization type Q8_1, "
            r"which cannot be de-quantized by the installed gguf package")


def test_dequantizer_missing_in_this_gguf_version(tmp_path, monkeypatch):
    """A type an older gguf cannot de-quantize (simulated for Q4_0)."""
    path, _ = tg.gguf_file("gemma2", tmp_path, qtypes={"blk.2.ffn_gate.weight": Q.Q4_0})
    real = gguf.quants.dequantize

    def dequantize(data, qtype):
        if qtype == Q.Q4_0:
            raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", dequantize)
    _raises(path, lambda: jm.load_model(path), r"tensor 'blk\.2\.ffn_gate\.weight' uses quantization type Q4_0")


@pytest.mark.parametrize("keep", [0.5, 0.02, 8, 4])
def test_truncated_file(tmp_path, f32_file, keep):
    """Cut in half, inside the metadata, right after the version, or leaving only the magic."""
    source, _ = f32_file("llama")
    data = source.read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    assert is_gguf(path)
    for call in (lambda: jm.load_model(path), lambda: jm.load(path)):
        _raises(path, call, r"not a readable GGUF file \(truncated or corrupt\?\)")


@pytest.mark.parametrize("key, value, match", [
    ("llama.embedding_length", 48, r"tensor 'token_embd\.weight' has shape \(128, 64\), expected \(128, 48\) from the config"),
    ("llama.feed_forward_length", 128, r"tensor 'blk\.0\.ffn_gate\.weight' has shape \(256, 64\), expected \(128, 64\)"),
    ("llama.attention.head_count_kv", 4, r"tensor 'blk\.0\.attn_k\.weight' has shape \(32, 64\), expected \(64, 64\)"),
    ("llama.attention.key_length", 8, r"tensor 'blk\.0\.attn_q\.weight' has shape \(64, 64\), expected \(32, 64\)"),
    ("llama.vocab_size", 100, r"tensor 'token_embd\.weight' has shape \(128, 64\), expected \(100, 64\)"),
    ("llama.block_count", 4, r"metadata llama\.block_count is 4 but the file has blocks 0\.\.2 \(3 distinct\)"),
    ("llama.block_count", 2, r"metadata llama\.block_count is 2 but the file has blocks 0\.\.2 \(3 distinct\)"),
])
def test_metadata_that_disagrees_with_the_tensors(tmp_path, key, value, match):
    path, _ = tg.gguf_file("llama", tmp_path, metadata={key: value})
    _raises(path, lambda: jm.load_model(path), match)


@pytest.mark.parametrize("kind", ["llama", "gemma3", "gpt2"])
def test_huge_block_count_fails_fast(tmp_path, kind, monkeypatch):
    """A block count near the uint32 limit is refused before any per-layer list is made, let alone a model."""
    arch = tg.architecture(tg.reference(kind))
    path, _ = tg.gguf_file(kind, tmp_path, metadata={f"{arch}.block_count": 2**32 - 1})
    built = []
    monkeypatch.setattr(nnx, "eval_shape", lambda *a, **k: built.append(1))
    start = time.perf_counter()
    _raises(path, lambda: jm.load_model(path), r"4294967295")
    assert time.perf_counter() - start < 5 and not built


@pytest.mark.parametrize("key, match", [
    ("general.architecture", r"metadata 'general\.architecture' is missing or not a string"),
    ("llama.embedding_length", r"metadata llama\.embedding_length is missing"),
    ("llama.block_count", r"metadata llama\.block_count is missing"),
    ("llama.attention.head_count", r"metadata llama\.attention\.head_count is missing"),
    ("llama.feed_forward_length", r"metadata llama\.feed_forward_length is missing"),
])
def test_missing_required_metadata(tmp_path, key, match):
    path, _ = tg.gguf_file("llama", tmp_path, metadata={key: None})
    _raises(path, lambda: jm.load_model(path), match)


def test_gpt2_missing_context_length(tmp_path):
    path, _ = tg.gguf_file("gpt2", tmp_path, metadata={"gpt2.context_length": None})
    _raises(path, lambda: jm.load_model(path), r"metadata gpt2\.context_length is missing")


def test_llama3_rope_factors_are_refused(tmp_path):
    converted = tg.convert(tg.reference("llama"))
    converted.tensors["rope_freqs.weight"] = np.ones(8, np.float32)
    path = tg.write(tmp_path / "llama3.gguf", converted)
    _raises(path, lambda: jm.load_model(path), r"'rope_freqs\.weight' .*not supported")


def test_unknown_tensor_is_named(tmp_path):
    converted = tg.convert(tg.reference("gemma2"))
    converted.tensors["blk.0.attn_q.bias"] = np.zeros(128, np.float32)
    path = tg.write(tmp_path / "bias.gguf", converted)
    _raises(path, lambda: jm.load_model(path), r"tensor 'blk\.0\.attn_q\.bias' is not used by the gemma2 port")


def test_missing_tensor_is_named(tmp_path):
    converted = tg.convert(tg.reference("gemma3"))
    del converted.tensors["blk.4.attn_k_norm.weight"]
    path = tg.write(tmp_path / "missing.gguf", converted)
    _raises(path, lambda: jm.load_model(path), r"missing 1 tensor.*'model\.layers\.4\.self_attn\.k_norm\.weight'")


# ---- is_gguf -------------------------------------------------------------------------------------


def _returns_quickly(call, seconds=5.0):
    """``call()``'s result or exception, asserting it returned within ``seconds`` (a FIFO open blocks)."""
    box = {}

    def run():
        try:
            box["result"] = call()
        except Exception as err:  # noqa: BLE001
            box["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "blocked"
    return box


def test_is_gguf(tmp_path, f32_file):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"GGML" + bytes(100))
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GG")
    empty = tmp_path / "empty.gguf"
    empty.touch()
    directory = tmp_path / "dir.gguf"
    directory.mkdir()
    shutil.copy(f32_file("gpt2")[0], directory / "model.gguf")
    for path in (fifo, not_gguf, short, empty, directory, tmp_path / "absent.gguf", "org/model"):
        assert _returns_quickly(lambda: is_gguf(path)) == {"result": False}, path
    assert is_gguf(directory / "model.gguf") and is_gguf(str(directory / "model.gguf"))
    # loading such paths fails clearly, without blocking on the FIFO
    for path in (fifo, not_gguf, empty):
        outcome = _returns_quickly(lambda: jm.load(path))
        assert type(outcome.get("error")) is FileNotFoundError and "not a GGUF file" in str(outcome["error"])
        outcome = _returns_quickly(lambda: jm.load_model(path))
        assert type(outcome.get("error")) is FileNotFoundError and str(path) in str(outcome["error"])
    with pytest.raises(FileNotFoundError, match="not a regular file"):
        GGUFCheckpoint(fifo)

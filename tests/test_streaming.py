"""The streamed (out-of-core) fit: same iterates as in memory, precision, inits, sources, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsnmf import SNMF
from jsnmf.fit import chunk_steps
from jsnmf.io import hostbuffers, prefetch, sources
from jsnmf.kernels.init import _times_u32, random_codes, random_keys
from jsnmf.store import ActivationStore

from rounding import rounding_tolerances
from snmf_reference import matched_cosines, planted_problem

N, D, K, CHUNK = 1000, 64, 6, 128  # 8 chunks, the last one short (104 rows)
LAYER = 2


def write_store(path, layers, dtype="float32", chunk_tokens=CHUNK):
    """An ActivationStore holding ``layers`` = {layer: X}."""
    n = len(next(iter(layers.values())))
    writer = ActivationStore.create(path, layers=list(layers), d_mlp=D, dtype=dtype, chunk_tokens=chunk_tokens)
    writer.append(layers, np.zeros(n, np.int32), np.zeros(n, np.int32), np.arange(n, dtype=np.int32),
                  np.full(n, -1, np.int32))
    return writer.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    X, F_true, _ = planted_problem(n=N, d=D, k=K, density=0.2, noise=0.1, seed=0)
    other, _, _ = planted_problem(n=N, d=D, k=K, density=0.2, noise=0.1, seed=1)
    root = tmp_path_factory.mktemp("stores")
    store = write_store(root / "f32", {LAYER: X, 5: other})
    bf16 = write_store(root / "bf16", {LAYER: X}, dtype="bfloat16")
    return X, F_true, store, bf16


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


SETTINGS = dict(sparsity=0.2, max_iter=20, tol=0.0, patience=1000)


@pytest.mark.parametrize("solver", SNMF.solvers)
def test_streamed_fit_equals_in_memory_fit(data, solver):
    X, _, store, _ = data
    memory = SNMF(K, solver=solver, **SETTINGS).fit(store.layer_array(LAYER))
    streamed = SNMF(K, solver=solver, **SETTINGS).fit(store, layer=LAYER)
    assert streamed.n_iter_ == memory.n_iter_ == 20
    # Same iterates up to float32 rounding of the chunked sums (the random start is the same G0).
    # The loss ‖X‖² − 2·tr(FᵀXᵀG) + tr(FᵀF·GᵀG) nearly cancels, so it carries a little more rounding.
    assert rel(streamed.features_, memory.features_) < 1e-5
    assert rel(streamed.codes_, memory.codes_) < 1e-5
    np.testing.assert_allclose(streamed.loss_history_, memory.loss_history_, rtol=3e-5)
    assert streamed.relative_error_ == pytest.approx(memory.relative_error_, rel=1e-5)
    assert isinstance(streamed.codes_, np.ndarray) and (streamed.codes_ >= 0).all()


def test_chunk_step_compiles_once_with_a_short_last_chunk(data):
    _, _, store, _ = data
    # A setting no other test uses, so this fit compiles its own per-chunk step.
    before = chunk_steps.codes_chunk._cache_size()
    SNMF(K, solver="hals", ridge=3e-6, **SETTINGS).fit(store, layer=LAYER)
    assert chunk_steps.codes_chunk._cache_size() - before == 1
    assert store.chunk_bounds[-1] == (896, 1000)  # the short chunk was padded, not compiled apart


@pytest.mark.parametrize("solver", ["hals", "ehals"])  # ehals keeps a fourth codes file, the previous codes
def test_codes_on_disk_and_memmap_input(data, tmp_path, solver):
    X, _, _, _ = data
    np.save(tmp_path / "X.npy", X)
    X_map = np.load(tmp_path / "X.npy", mmap_mode="r")
    memory = SNMF(K, solver=solver, **SETTINGS).fit(X)
    streamed = SNMF(K, solver=solver, **SETTINGS).fit(X_map, codes_on_disk=tmp_path / "codes", chunk_tokens=300)
    assert isinstance(streamed.codes_, np.memmap)
    assert sorted(p.name for p in (tmp_path / "codes").iterdir()) == ["codes.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "codes" / "codes.npy"), streamed.codes_)
    assert rel(streamed.codes_, memory.codes_) < 1e-5
    assert rel(streamed.features_, memory.features_) < 1e-5


class NpyChunks:
    """A minimal chunk source (the protocol, not an ActivationStore) over a .npy memmap, uneven chunks."""

    def __init__(self, path, bounds):
        self.X = np.load(path, mmap_mode="r")
        self.n_tokens, self.d_mlp = self.X.shape
        self.chunk_bounds = bounds
        self.reads = 0

    def read(self, layer, start, stop, *, raw=False):
        self.reads += 1
        return np.array(self.X[start:stop])


def test_protocol_source_with_uneven_chunks(data, tmp_path):
    X, _, _, _ = data
    np.save(tmp_path / "X.npy", X)
    source = NpyChunks(tmp_path / "X.npy", [(0, 100), (100, 350), (350, 360), (360, 1000)])
    init = (np.ones((D, K), np.float32), np.random.default_rng(0).random((N, K)).astype(np.float32) + 0.01)
    memory = SNMF(K, solver="mu", init=init, **SETTINGS).fit(X)
    streamed = SNMF(K, solver="mu", init=init, **SETTINGS).fit(source)
    assert source.reads >= 21 * 4  # the initial pass and one pass per iteration
    assert rel(streamed.codes_, memory.codes_) < 1e-5
    np.testing.assert_allclose(streamed.loss_history_, memory.loss_history_, rtol=3e-5)


def test_bfloat16_store_stays_close_to_float32(data):
    X, F_true, store, bf16 = data
    assert sources.make_plan(bf16, LAYER).raw_dtype == jnp.bfloat16  # streamed as stored: 2 bytes a value
    settings = dict(solver="hals", sparsity=0.2, max_iter=150, tol=1e-7, patience=30)
    full = SNMF(K, **settings).fit(store, layer=LAYER)
    low = SNMF(K, dtype="bfloat16", **settings).fit(bf16)
    assert low.features_.dtype == np.float32 and low.codes_.dtype == np.float32
    # Tolerance: bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 ≈ 0.002 per value).
    assert abs(low.relative_error_ - full.relative_error_) < 0.01
    assert matched_cosines(full.features_, low.features_).min() >= 0.99


def test_stopping_rule_and_best_iterate_match_in_memory(data):
    X, _, store, _ = data
    settings = dict(solver="hals", sparsity=0.2, max_iter=500, tol=1e-4, patience=5)
    memory = SNMF(K, **settings).fit(X)
    streamed = SNMF(K, **settings).fit(store, layer=LAYER)
    assert streamed.n_iter_ == memory.n_iter_ < 500
    np.testing.assert_allclose(streamed.loss_history_, memory.loss_history_, rtol=3e-5)
    best = int(np.argmin(streamed.loss_history_))
    assert streamed.reconstruction_err_ == pytest.approx(np.sqrt(streamed.loss_history_[best]), rel=1e-6)
    recon = np.linalg.norm(X - streamed.codes_ @ streamed.features_.T)
    assert recon == pytest.approx(streamed.reconstruction_err_, rel=1e-3)


@pytest.mark.parametrize("init", ["random", "kmeans", "svd", "tokens"])
def test_streamed_starts_are_the_in_memory_starts(data, init):
    """Each initializer is one sequence of passes (jsnmf.fit.starts): over the store's chunks it
    starts where the in-memory fit (one chunk) starts, up to the order of float sums."""
    X, _, store, _ = data
    settings = dict(solver="hals", sparsity=0.2, init=init, max_iter=3, tol=0.0, patience=1000)
    memory, tolerances = rounding_tolerances(lambda: SNMF(K, **settings), X)
    streamed = SNMF(K, **settings).fit(store, layer=LAYER)
    tolerances.check(memory, streamed.features_, streamed.codes_, streamed.loss_history_, f"streamed {init}")


def test_random_codes_equal_jax_uniform_rows():
    _, key_G = random_keys(jax.random.key(7))
    full = np.maximum(np.asarray(jax.random.uniform(key_G, (3000, 5), jnp.float32)), 1e-6)
    for start in [0, 1024, 1111, 2300]:  # one compilation: the start is traced
        np.testing.assert_array_equal(np.asarray(random_codes(key_G, jnp.int32(start), 700, 5)),
                                      full[start:start + 700])
    # The 64-bit Threefry counter row·k + column, from 32-bit words, for rows past 2³² / k.
    a = np.array([0, 1, 65535, 65536, 4_000_000_000, 2**32 - 1], np.uint32)
    b = np.array([3, 70000, 65537, 65536, 4095, 2**32 - 1], np.uint32)
    high, low = _times_u32(jnp.asarray(a), jnp.asarray(b))
    product = a.astype(np.uint64) * b.astype(np.uint64)
    np.testing.assert_array_equal(np.asarray(high), (product >> np.uint64(32)).astype(np.uint32))
    np.testing.assert_array_equal(np.asarray(low), (product & np.uint64(0xFFFFFFFF)).astype(np.uint32))


# -- bad input ------------------------------------------------------------------------------------

def test_store_layer_must_be_chosen_and_present(data):
    _, _, store, _ = data
    with pytest.raises(ValueError, match=r"holds layers \[2, 5\]: pass fit\(store, layer=L\)"):
        SNMF(K).fit(store)
    with pytest.raises(ValueError, match="layer 7 is not in the store"):
        SNMF(K).fit(store, layer=7)
    with pytest.raises(ValueError, match="layer= selects a layer of an ActivationStore"):
        SNMF(K).fit(np.ones((10, 8), np.float32), layer=1)


def test_bad_streamed_data_is_reported(tmp_path):
    X = np.random.default_rng(0).random((300, D)).astype(np.float32)
    X[257, 9] = np.nan  # (a store refuses non-finite values when it is written; a memmap does not)
    np.save(tmp_path / "nan.npy", X)
    with pytest.raises(ValueError, match=r"NaN or Inf \(first at row 257, column 9 of .*nan.npy, chunk \[256, 300\)\)"):
        SNMF(3, max_iter=2).fit(np.load(tmp_path / "nan.npy", mmap_mode="r"), chunk_tokens=128)
    zeros = write_store(tmp_path / "zeros", {0: np.zeros((50, D), np.float32)})
    with pytest.raises(ValueError, match="all zeros"):
        SNMF(3, max_iter=2).fit(zeros)
    with pytest.raises(ValueError, match=r"rank 51 exceeds min\(n_tokens, d_mlp\) = 50 for X of shape \(50, 64\)"):
        SNMF(51).fit(zeros)
    with pytest.raises(ValueError, match=r"init G0 must have shape \(n_tokens, rank\) = \(50, 3\)"):
        SNMF(3, init=(np.ones((D, 3)), np.ones((40, 3)))).fit(zeros)
    source = NpyChunks.__new__(NpyChunks)
    source.n_tokens, source.d_mlp, source.chunk_bounds = 100, D, [(0, 50), (60, 100)]
    with pytest.raises(ValueError, match=r"chunk bounds must tile \[0, 100\) in order; found \(60, 100\) after 50"):
        SNMF(3).fit(source)


@pytest.mark.parametrize("kwargs, message", [
    (dict(chunk_tokens=0), "chunk_tokens must be a positive integer"),
    (dict(codes_on_disk=3), "codes_on_disk must be True, False or a directory path"),
    (dict(checkpoint_every=0), "checkpoint_every must be a positive integer"),
    (dict(max_to_keep=0), "max_to_keep must be a positive integer"),
])
def test_bad_streaming_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SNMF(3).fit(np.ones((8, 4), np.float32), **kwargs)


def test_a_pass_holds_at_most_two_chunks_of_x(data):
    """The reader maps the next chunk file only once JAX has let go of the one before the last."""
    _, _, store, _ = data
    plan = sources.make_plan(store, LAYER, force=True)
    chunk_files = {str(store.chunk_path(LAYER, i)) for i in range(len(store.chunk_bounds))}
    mapped_counts = []
    for _ in range(3):
        for chunk in prefetch.stream_chunks(plan, prefetch.Placement(None, plan)):
            jax.block_until_ready(jnp.sum(chunk.X.astype(jnp.float32)))  # use the chunk, as a step does
            with open("/proc/self/maps") as maps:
                mapped_counts.append(len({line.split()[-1] for line in maps} & chunk_files))
    assert len(mapped_counts) == 3 * len(store.chunk_bounds)
    assert max(mapped_counts) <= 2 and min(mapped_counts) >= 1


def test_host_chunks_wait_for_jax_to_let_go(tmp_path):
    import threading
    import time

    path = tmp_path / "rows.npy"
    np.save(path, np.arange(64 * 16, dtype=np.float32).reshape(64, 16))
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        offset = f.tell()
    host = hostbuffers.HostChunks((64, 16), np.float32, keep=2)
    first = host.mapped(sources.map_rows(path, offset, (64, 16), np.float32))
    held = jax.device_put(host.mapped(sources.map_rows(path, offset, (64, 16), np.float32)))
    del first  # the first mapping is unused now: unmapped while waiting
    released, checked = [], threading.Event()

    def let_go():  # only after the first check: a busy machine can delay the main thread past any sleep
        checked.wait()
        time.sleep(0.2)  # so that the second wait below is really waiting
        released.append(time.perf_counter())
        held.delete()

    threading.Thread(target=let_go, daemon=True).start()
    host.wait_for_room()  # room for one more: the first is gone, the second still used
    assert not released and host._in_use() == 1
    checked.set()
    third = host.mapped(sources.map_rows(path, offset, (64, 16), np.float32))
    host.wait_for_room()  # two in use until the JAX array is deleted
    assert released and time.perf_counter() >= released[0]
    assert host._in_use() == 1
    np.testing.assert_array_equal(third[1], np.arange(16, 32))


def test_a_finished_fit_lets_go_of_its_plan_without_the_garbage_collector(data):
    """No reference cycle keeps the plan, and the chunk files it maps, alive after a fit."""
    import gc
    import weakref

    from jsnmf.io import sources as sources_module

    _, _, store, _ = data
    plans = []
    real = sources_module.StreamPlan.__post_init__

    def spy(self):
        real(self)
        plans.append(weakref.ref(self))

    gc.disable()
    try:
        sources_module.StreamPlan.__post_init__ = spy
        SNMF(K, **SETTINGS).fit(store, layer=LAYER)
        assert plans and all(plan() is None for plan in plans)
    finally:
        sources_module.StreamPlan.__post_init__ = real
        gc.enable()

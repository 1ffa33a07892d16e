"""Fitting over many devices and hosts: each process feeds its own tokens, statistics are summed.

How the sharded fit works
-------------------------
``SNMF(...).fit(X, mesh=mesh)`` splits the tokens (rows of ``X`` and ``G``) over the mesh axis ``data``;
``F`` is replicated and only the d×k and k×k statistics cross devices (one all-reduce per
iteration, see :mod:`jsnmf.kernels.sharded`). With ``mesh=None`` the fit uses every device
JAX sees (``jax.devices()``), so on one host with 8 GPUs ``SNMF(k).fit(X)`` is already sharded.

Across hosts (``jax.process_count() > 1``) every process runs the same script and passes **its
own rows** of ``X`` to ``fit``, ``transform`` and ``score`` (each given the same ``mesh``): the global ``X`` is the concatenation
of the processes' rows in process-index order (process 0's first). After ``fit``:

* ``features_``, ``loss_history_`` and the errors are the same on every process (NumPy arrays);
* ``codes_`` holds the codes of **this process's rows** only (same order as its ``X``);
  :func:`gather_rows` concatenates all of them on every process if you need the whole ``G``;
* ``transform(X_local)`` returns the codes of the rows given; ``score(X_local)`` the explained
  variance of the whole global ``X`` (identical on every process).

Processes may hold different numbers of rows; each process's block is padded with zero rows to
a whole number of rows per device (zero rows keep zero codes and contribute nothing). The fit
gives the same result as a single-process fit of the concatenated ``X`` (up to the order of float
sums), including the default random start, which is drawn by global row index.

For an :class:`~jsnmf.store.ActivationStore` on a shared file system, pass the store itself: each
process streams its contiguous share of the chunks (:func:`process_token_range`), one pass per
iteration, each chunk split over the process's devices; or, when the shares fit in memory,
:func:`process_rows` reads this process's share to fit in memory::

    model = jsnmf.SNMF(rank=256).fit(store, layer=12, mesh=mesh)                       # streamed
    model = jsnmf.SNMF(rank=256).fit(jsnmf.distributed.process_rows(store, 12), mesh=mesh)   # in memory

Checkpoints (``fit(..., checkpoint_dir=..., resume=True)``, the directory on the shared file
system) hold the codes as a global array, each process writing its own rows; a resume reads them
back on any mesh or number of processes (each process keeps its rows).

``fit``/``transform``/``score`` assemble the global ``X`` from the local rows on every call; to do
it once, ``rows = jsnmf.distributed.global_rows(X_local, mesh)`` and pass ``rows`` instead of
``X_local``. ``jsnmf.fit_layers`` (:mod:`jsnmf.batch`) shards a batch of layers the same way.
The ``"svd"`` and ``"kmeans"`` starts run on the zero-padded global ``X``; when there is padding
they can differ slightly from the single-device start (the random start never does).

Extracting the activations on many hosts
----------------------------------------
Every process calls :func:`jsnmf.extract.extract` with the same arguments and ``out_dir`` on the shared file
system; each runs the model on its own devices over its share of the store's chunks, and process 0
completes the one manifest (:mod:`jsnmf.extract` says how). The store is the one a single device makes::

    jsnmf.distributed.initialize()
    store = jsnmf.extract.extract("SmolLM2-135M.gguf", "corpus.jsonl", "/mnt/run/store", layers=[15])
    model = jsnmf.SNMF(rank=256).fit(store, layer=15)          # then every process fits its share

Launching on a GPU cluster
--------------------------
Run the same script once per host (one process drives all the host's GPUs) or once per GPU.
Before any other JAX call, every process calls::

    jsnmf.distributed.initialize(coordinator_address="10.0.0.1:1234",   # host of process 0, a free port
                                 num_processes=4, process_id=RANK)       # RANK in 0..3, e.g. from your launcher

``coordinator_address`` may instead come from the environment variable ``JAX_COORDINATOR_ADDRESS``
and the visible GPUs from ``JAX_LOCAL_DEVICE_IDS`` (e.g. ``"0"`` for one process per GPU; or
pass ``local_device_ids=[LOCAL_RANK]``, or set ``CUDA_VISIBLE_DEVICES``). Under SLURM and Open MPI
``initialize()`` with no arguments finds the coordinator, the process count and id itself, and
assumes one process per GPU (it makes only GPU ``SLURM_LOCALID`` / ``OMPI_COMM_WORLD_LOCAL_RANK``
visible)::

    srun --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 python fit_layer.py   # 32 processes

For one process per node under SLURM, pass ``local_device_ids=list(range(8))`` as well.

Launching on a TPU pod slice
----------------------------
Every host of the slice runs the same script; ``jsnmf.distributed.initialize()`` with no
arguments finds the other hosts from the TPU metadata::

    gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b --worker=all \\
        --command="cd jsnmf && python fit_layer.py --store /mnt/store --layer 12"

The store (or the activations) must be readable from every host, e.g. a shared disk or a bucket
mounted with gcsfuse; each host reads only its share (:func:`process_rows`).

Multi-process on one machine (CPU, for testing)
-----------------------------------------------
``initialize(..., cpu_collectives="gloo")`` selects gloo for CPU all-reduces, and
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` gives each process N CPU devices
(``tests/test_multihost.py`` does exactly this with two processes).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jsnmf.kernels.sharded import DATA, check_mesh
from jsnmf.validation import validate_matrix

__all__ = [
    "initialize", "default_mesh", "RowLayout", "ShardedRows", "global_rows", "process_rows",
    "process_token_range", "gather_rows", "replicate", "replicated_value", "sample_rows",
    "sum_over_processes", "per_process", "all_or_none",
]


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: Any = None,
               cpu_collectives: str | None = None, **kwargs) -> None:
    """Join the multi-process job: ``jax.distributed.initialize`` (call before any other JAX use).

    The arguments are those of ``jax.distributed.initialize``; all may be left out on a TPU pod
    slice and under SLURM / Open MPI, where the cluster environment supplies them.
    ``cpu_collectives="gloo"`` selects gloo for cross-process reductions on CPU devices.
    """
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids, **kwargs)


def default_mesh() -> Mesh:
    """A 1-D mesh over every device of every process, axis ``data`` (process 0's devices first)."""
    devices = sorted(jax.devices(), key=lambda device: (device.process_index, device.id))
    return Mesh(np.array(devices), (DATA,))


# -- where each process's rows live -----------------------------------------------------------------

def _process_positions(mesh: Mesh) -> dict[int, range]:
    """For each process, the contiguous range of positions along ``data`` its devices hold."""
    axis = mesh.axis_names.index(DATA)
    by_position = np.moveaxis(mesh.devices, axis, 0).reshape(mesh.shape[DATA], -1)
    owners = []
    for position, devices in enumerate(by_position):
        processes = {device.process_index for device in devices}
        if len(processes) != 1:
            raise ValueError(
                f"devices at position {position} of the mesh axis {DATA!r} belong to processes {sorted(processes)}: "
                f"every process must hold its own rows, so lay the processes out along {DATA!r}"
            )
        owners.append(processes.pop())
    positions: dict[int, range] = {}
    for process in sorted(set(owners)):
        held = [i for i, owner in enumerate(owners) if owner == process]
        if held != list(range(held[0], held[-1] + 1)):
            raise ValueError(f"process {process} holds non-adjacent positions {held} of the mesh axis {DATA!r}")
        positions[process] = range(held[0], held[-1] + 1)
    missing = sorted(set(range(jax.process_count())) - set(positions))
    if missing:
        raise ValueError(f"processes {missing} have no device in the mesh; every process must hold rows")
    return positions


def _gather_local_facts(n_rows: int, n_columns: int, error: str | None) -> np.ndarray:
    """Every process's ``(n_rows, n_columns, failed)``; if any process's rows are bad, all raise.

    Agreeing first keeps a process whose input is invalid from leaving the others waiting forever
    in a collective.
    """
    if jax.process_count() == 1:
        if error:
            raise ValueError(error)
        return np.array([[n_rows, n_columns, 0]])
    from jax.experimental import multihost_utils

    facts = np.asarray(multihost_utils.process_allgather(np.array([n_rows, n_columns, bool(error)], np.int32)))
    failed = [int(p) for p in np.nonzero(facts[:, 2])[0]]
    if error:
        raise ValueError(f"process {jax.process_index()}: {error}")
    if failed:
        raise ValueError(f"the rows given to process(es) {failed} are invalid (see their error); "
                         f"the rows of process {jax.process_index()} were fine")
    widths = sorted({int(w) for w in facts[:, 1]})
    if len(widths) > 1:
        raise ValueError(f"processes were given X with different numbers of columns: {facts[:, 1].tolist()}")
    return facts


@dataclass(frozen=True)
class RowLayout:
    """How the global rows (tokens) are laid out over the mesh.

    Process ``p`` holds positions ``positions[p]`` of the ``data`` axis, each ``shard_rows`` rows:
    its ``rows_per_process[p]`` real rows first, then zero padding. Global row order (for random
    starts and :func:`gather_rows`) is the processes' rows in process-index order.
    """

    mesh: Mesh
    rows_per_process: tuple[int, ...]
    positions: tuple[range, ...]  # by process index
    shard_rows: int

    @classmethod
    def build(cls, mesh: Mesh, rows_per_process) -> "RowLayout":
        check_mesh(mesh)
        positions = _process_positions(mesh)
        counts = tuple(int(c) for c in rows_per_process)
        if len(counts) != len(positions):
            raise ValueError(f"{len(counts)} row counts for {len(positions)} processes")
        shard_rows = max(max(math.ceil(c / len(positions[p])) for p, c in enumerate(counts)), 1)
        return cls(mesh, counts, tuple(positions[p] for p in range(len(counts))), shard_rows)

    @property
    def n_rows(self) -> int:
        """Real rows over all processes."""
        return sum(self.rows_per_process)

    @property
    def n_padded(self) -> int:
        return self.mesh.shape[DATA] * self.shard_rows

    @property
    def local_rows(self) -> int:
        return self.rows_per_process[jax.process_index()]

    @property
    def local_offset(self) -> int:
        """Global index (in token order) of this process's first row."""
        return sum(self.rows_per_process[: jax.process_index()])

    @property
    def local_block(self) -> int:
        """Rows (real and padding) this process holds."""
        return len(self.positions[jax.process_index()]) * self.shard_rows

    def sharding(self, ndim: int = 2, row_axis: int = 0) -> NamedSharding:
        spec = [None] * ndim
        spec[row_axis] = DATA
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def assemble(self, local: np.ndarray, row_axis: int = 0) -> jax.Array:
        """The global array from this process's rows (``local_rows`` of them along ``row_axis``)."""
        local = np.asarray(local)
        if local.shape[row_axis] != self.local_rows:
            raise ValueError(f"expected {self.local_rows} rows along axis {row_axis}; got shape {local.shape}")
        padded = local
        if self.local_block != self.local_rows:
            pad = [(0, 0)] * local.ndim
            pad[row_axis] = (0, self.local_block - self.local_rows)
            padded = np.pad(local, pad)
        global_shape = list(local.shape)
        global_shape[row_axis] = self.n_padded
        return jax.make_array_from_process_local_data(self.sharding(local.ndim, row_axis), padded,
                                                      tuple(global_shape))

    def padded_index(self, rows) -> np.ndarray:
        """Positions in the padded global array of global rows ``rows`` (token order)."""
        rows = np.asarray(rows, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise ValueError(f"row index out of range [0, {self.n_rows})")
        offsets = np.cumsum([0, *self.rows_per_process])
        process = np.searchsorted(offsets, rows, side="right") - 1
        block_starts = np.array([positions.start * self.shard_rows for positions in self.positions])
        return block_starts[process] + rows - offsets[process]

    def valid(self) -> jax.Array:
        """Global (n_padded,) bool: True on real rows, False on padding."""
        return self.assemble(np.ones(self.local_rows, bool))

    def local_part(self, array: jax.Array, row_axis: int = 0) -> np.ndarray:
        """This process's real rows of a global row-sharded ``array``, as NumPy."""
        block_start = self.positions[jax.process_index()].start * self.shard_rows
        shape = list(array.shape)
        shape[row_axis] = self.local_block
        out = np.zeros(shape, array.dtype)
        for shard in array.addressable_shards:
            rows = shard.index[row_axis]
            start = (rows.start or 0) - block_start
            index = [slice(None)] * array.ndim
            index[row_axis] = slice(start, start + shard.data.shape[row_axis])
            out[tuple(index)] = np.asarray(shard.data)
        index = [slice(None)] * array.ndim
        index[row_axis] = slice(0, self.local_rows)
        return out[tuple(index)]


@dataclass(frozen=True)
class ShardedRows:
    """A global row-sharded ``X`` (padded) and its :class:`RowLayout`; ``fit`` accepts it directly."""

    array: jax.Array
    layout: RowLayout

    @property
    def n_columns(self) -> int:
        return int(self.array.shape[-1])


def global_rows(X_local, mesh: Mesh | None = None, dtype: Any = np.float32, name: str = "X") -> ShardedRows:
    """Assemble the global ``X`` from every process's rows (``jax.make_array_from_process_local_data``).

    A collective: every process must call it. ``X_local`` is this process's rows (n_local × d);
    they are checked (2-D floats, finite) on every process before anything is exchanged, so bad
    input raises a ``ValueError`` everywhere instead of hanging. ``dtype`` is the storage precision.
    """
    mesh = default_mesh() if mesh is None else check_mesh(mesh)
    error, n_rows, n_columns = None, 0, 0
    try:
        X_local = validate_matrix(X_local, name)
        n_rows, n_columns = X_local.shape
    except ValueError as err:
        error = str(err)
    facts = _gather_local_facts(n_rows, n_columns, error)
    layout = RowLayout.build(mesh, facts[:, 0])
    X_local = np.asarray(X_local).astype(dtype, copy=False)
    return ShardedRows(layout.assemble(X_local), layout)


def sample_rows(rows: ShardedRows, indices) -> np.ndarray:
    """Global rows ``indices`` (token order) of a :class:`ShardedRows`, as float32 NumPy on every process.

    A collective (every process must call it); it moves only the rows asked for.
    """
    index = replicate(rows.layout.padded_index(indices), rows.layout.mesh)
    return replicated_value(_row_taker(rows.layout.mesh)(rows.array, index))


@functools.lru_cache(maxsize=16)
def _row_taker(mesh):
    """Compiled ``(X, indices) -> X[indices]`` replicated on ``mesh`` (one per mesh: a new jit per call
    recompiled at every checkpointed fit)."""
    return jax.jit(lambda X, i: X[i].astype(np.float32), out_shardings=NamedSharding(mesh, PartitionSpec()))


def sum_over_processes(value) -> np.ndarray:
    """The sum of ``value`` (same shape everywhere) over all processes, on every process (a collective)."""
    value = np.asarray(value)
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value)).sum(axis=0).astype(value.dtype)


def per_process(value: int) -> np.ndarray:
    """Every process's ``value`` (an integer), in process-index order (a collective)."""
    counts = np.zeros(jax.process_count(), np.int64)
    counts[jax.process_index()] = value
    return sum_over_processes(counts)


def replicate(value, mesh: Mesh) -> jax.Array:
    """``value`` (the same on every process) as a global array replicated on every device of ``mesh``."""
    value = np.asarray(value)
    return jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec()), value, value.shape)


def replicated_value(array: jax.Array) -> np.ndarray:
    """A replicated global array as NumPy (read from this process's first device)."""
    return np.asarray(array.addressable_data(0))


# -- feeding processes from a store -----------------------------------------------------------------

def process_token_range(store, process_index: int | None = None, process_count: int | None = None) -> tuple[int, int]:
    """Token range ``[start, stop)`` of this process's share of ``store``: whole chunks, contiguous,
    balanced by tokens, in process-index order (so the shares concatenate to the whole store)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    bounds = store.chunk_bounds
    if len(bounds) < process_count:
        raise ValueError(f"{store.path}: {len(bounds)} chunks cannot be shared by {process_count} processes; "
                         "extract with a smaller chunk size")
    n_tokens = bounds[-1][1]
    ends = np.array([stop for _, stop in bounds])
    # cuts[p]: chunks given to processes before p; each cut at the chunk end nearest to p/P of the
    # tokens, kept strictly increasing so that every process gets at least one chunk.
    cuts = [0]
    for p in range(1, process_count):
        nearest = int(np.argmin(np.abs(ends - p * n_tokens / process_count))) + 1
        cuts.append(min(max(nearest, cuts[-1] + 1), len(bounds) - (process_count - p)))
    cuts.append(len(bounds))
    first, last = cuts[process_index], cuts[process_index + 1]
    return bounds[first][0], bounds[last - 1][1]


def process_rows(store, layer: int, *, raw: bool = False) -> np.ndarray:
    """This process's rows of ``layer`` (:func:`process_token_range`), to pass to ``SNMF.fit``."""
    start, stop = process_token_range(store)
    return store.read(layer, start, stop, raw=raw)


def gather_rows(local) -> np.ndarray:
    """Every process's rows (e.g. ``model.codes_``), concatenated in process-index order, on every process."""
    local = np.asarray(local)
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    counts = np.asarray(multihost_utils.process_allgather(np.array([local.shape[0]], np.int32)))[:, 0]
    padded = np.zeros((int(counts.max()),) + local.shape[1:], local.dtype)
    padded[: local.shape[0]] = local
    everything = np.asarray(multihost_utils.process_allgather(padded))
    return np.concatenate([everything[p, :c] for p, c in enumerate(counts)])


# -- failing together -------------------------------------------------------------------------------

@contextlib.contextmanager
def all_or_none(doing: str):
    """Run the block on every process, then agree whether any failed (a collective, also a barrier).

    A process whose block raised an ``Exception`` tells the others and re-raises it; the others raise a
    ``RuntimeError`` naming it, instead of waiting forever in a later collective for a process that gave
    up. ``doing`` says what the block does, for that error. One process: the block alone.
    """
    try:
        yield
    except Exception:
        if jax.process_count() > 1:
            _agree(True, doing)
        raise
    if jax.process_count() > 1:
        _agree(False, doing)


def _agree(failed: bool, doing: str) -> None:
    """Tell every process whether this one ``failed``; raise if it did not but another did."""
    flags = per_process(int(failed))
    others = [p for p, flag in enumerate(flags) if flag and p != jax.process_index()]
    if others and not failed:
        raise RuntimeError(f"process(es) {others} failed while {doing} (see their error); "
                           f"process {jax.process_index()} stops too")

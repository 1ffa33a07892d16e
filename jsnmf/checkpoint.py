"""Checkpoints of a running fit, so that a killed fit resumes where it stopped.

A checkpoint directory holds::

    problem.json        JSON manifest naming the problem: settings, shape, data fingerprint, source
    <iteration>/        one orbax step per saved iteration (the newest ``max_to_keep`` are kept)
        state/          the fit state (arrays; orbax StandardSave)
        problem/        the same manifest, so each step describes itself (orbax JsonSave), plus
                        ``checksums``: the sha256 of each host array of the state (:func:`array_digest`),
                        verified on restore (steps written before checksums were recorded restore unchecked)

orbax's ``CheckpointManager`` writes each step under a temporary name and renames it when complete,
so a kill at any moment leaves only complete steps (temporary leftovers are removed on the next
start); saves run in a background thread while the fit goes on.

The state is everything the iteration and its stopping rule carry (docs/architecture.md "The algorithm"): the
codes ``G`` of the latest iterate and the statistics ``XᵀG``, ``GᵀG``, ``Σ P⊙G`` of that pass (the
next ``F`` follows from them), the best iterate, the patience clock, the loss history and ``‖X‖²``.
The random start is drawn once from ``seed`` (recorded in the manifest) before the first iteration,
so no RNG state is needed after it. In-memory and streamed fits write the same state, so either can
resume the other's checkpoint (equal up to float rounding; bitwise when the same path resumes).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jsnmf.io.digests import array_digests, check_digests
from jsnmf import __version__
from jsnmf.io.files import atomic_write_json
from jsnmf.io.manifest import check_manifest, read_manifest

FORMAT = "jsnmf.fit_checkpoint"
FORMAT_VERSION = 1
PROBLEM_FILE = "problem.json"
# Settings and data that define the iterates: a checkpoint of another problem is refused.
IDENTITY = ("rank", "solver", "sparsity", "ridge", "hals_sweeps", "init", "seed", "dtype",
            "n_tokens", "d_mlp", "fingerprint")
FINGERPRINT_ROWS = 64  # rows of X hashed, evenly spaced from the first to the last


def fingerprint_rows(n: int) -> np.ndarray:
    """The rows of ``X`` that :func:`data_fingerprint` reads."""
    return np.unique(np.linspace(0, n - 1, min(n, FINGERPRINT_ROWS)).round().astype(np.int64))


def data_fingerprint(rows: np.ndarray, n: int, d: int) -> str:
    """sha256 of the shape of ``X`` and of its rows :func:`fingerprint_rows` (``rows``, as float32).

    A sample, not a checksum of every value: cheap on a store larger than memory, and the same
    for a store, for its layer loaded into memory, and for any split of the rows over processes,
    so all these fits can share a checkpoint.
    """
    digest = hashlib.sha256(f"{n}x{d}".encode())
    digest.update(np.ascontiguousarray(np.asarray(rows, dtype="<f4")).tobytes())
    return digest.hexdigest()


def problem_manifest(params: dict[str, Any], n: int, d: int, fingerprint: str, source: dict | None = None) -> dict:
    """The JSON manifest of a fit: what defines its iterates (``IDENTITY``) plus descriptive fields."""
    init = params["init"] if isinstance(params["init"], str) else "arrays"
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "jsnmf_version": __version__,
        **{name: params[name] for name in ("rank", "solver", "sparsity", "ridge", "hals_sweeps", "seed", "dtype")},
        "init": init,
        "n_tokens": int(n),
        "d_mlp": int(d),
        "fingerprint": fingerprint,
        "source": source or {"kind": "array"},
        "stopping": {name: params[name] for name in ("max_iter", "tol", "patience")},
    }


@dataclass
class FitProgress:
    """A fit's state at the end of an iteration (the content of a checkpoint).

    ``best_G`` is None when the latest iterate is the best one (``G`` then is the best codes).
    The codes of a sharded fit are the global row-sharded arrays, saved as they are (each process
    writes its own rows): ``row_blocks`` then gives, for each process in order, its real rows and
    the rows it holds with padding, so that a restore can drop the padding. Restored (and in
    unsharded fits) ``G`` and ``best_G`` are host arrays of the ``n`` real rows in token order.
    """

    G: Any  # (n, k) codes of the latest iterate; or the padded global array of a sharded fit
    best_G: Any | None  # codes of the best iterate (same layout), None = same as G
    XtG: np.ndarray  # (d, k) statistics of G
    GtG: np.ndarray  # (k, k)
    PG: np.ndarray  # ()
    best_F: np.ndarray  # (d, k)
    best_loss: float
    reference_loss: float  # loss at the last improvement larger than tol·‖X‖²
    since_improvement: int
    iteration: int
    sq_norm_X: float
    loss_history: np.ndarray  # (iteration,)
    row_blocks: np.ndarray | None = None  # (processes, 2): real rows, rows held; None = no padding
    # An extrapolated solver's momentum (kernels.fit.Momentum's fields by name; "G" in the layout of G)
    momentum: dict[str, Any] | None = None

    def to_tree(self) -> dict[str, Any]:
        best_is_current = self.best_G is None
        k = self.G.shape[1]
        row_blocks = self.row_blocks if self.row_blocks is not None else [[self.G.shape[0]] * 2]
        return {
            "G": self.G,
            # orbax needs an array here; a 1×k stand-in when the best codes are G itself.
            "best_G": np.zeros((1, k), np.float32) if best_is_current else self.best_G,
            "best_is_current": np.asarray(best_is_current),
            "row_blocks": np.asarray(row_blocks, np.int64),
            "XtG": np.asarray(self.XtG, np.float32),
            "GtG": np.asarray(self.GtG, np.float32),
            "PG": np.asarray(self.PG, np.float32),
            "best_F": np.asarray(self.best_F, np.float32),
            "best_loss": np.float32(self.best_loss),
            "reference_loss": np.float32(self.reference_loss),
            "since_improvement": np.int32(self.since_improvement),
            "iteration": np.int32(self.iteration),
            "sq_norm_X": np.float32(self.sq_norm_X),
            # orbax cannot store an empty array; a checkpoint always follows at least one iteration.
            "loss_history": np.asarray(self.loss_history, np.float32),
            **{f"{MOMENTUM}{name}": value if name == "G" else np.asarray(value, np.float32)
               for name, value in (self.momentum or {}).items()},
        }

    @classmethod
    def from_fit_state(cls, state, loss_history: np.ndarray, sq_norm_X: float, layout=None) -> "FitProgress":
        """From the compiled loop's ``kernels.fit.FitState``.

        ``layout``: the :class:`~jsnmf.distributed.RowLayout` of a sharded fit, whose codes are kept
        as global arrays (orbax copies each process's rows to its host before ``save`` returns).
        """
        from jsnmf.distributed import replicated_value

        value = replicated_value
        if layout is None:
            G, best_G, blocks = np.asarray(state.G), np.asarray(state.best_G), None
        else:
            G, best_G, blocks = state.G, state.best_G, row_blocks(layout)
        momentum = None
        if state.momentum is not None:
            momentum = {name: (leaf if layout is not None else np.asarray(leaf)) if name == "G" else value(leaf)
                        for name, leaf in state.momentum._asdict().items()}
        return cls(momentum=momentum,
            G=G, best_G=best_G, XtG=value(state.stats.XtG), GtG=value(state.stats.GtG), PG=value(state.stats.PG),
            best_F=value(state.best_F), best_loss=float(value(state.best_loss)),
            reference_loss=float(value(state.reference_loss)), since_improvement=int(value(state.since_improvement)),
            iteration=int(value(state.iteration)), sq_norm_X=sq_norm_X,
            loss_history=np.asarray(loss_history, np.float32), row_blocks=blocks)

    def is_done(self, *, patience: int, max_iter: int) -> bool:
        """Whether the stopping rule holds (re-evaluated: a larger ``max_iter`` continues a fit)."""
        from jsnmf.kernels.fit import stopped

        last = self.loss_history[-1] if len(self.loss_history) else np.float32(0.0)
        return bool(stopped(self.since_improvement, self.iteration, last, patience, max_iter))

    def to_fit_state(self, *, patience: int, max_iter: int, G=None, best_G=None, momentum_G=None, place=None):
        """The compiled loop's ``FitState``.

        ``G``, ``best_G``, ``momentum_G``: the codes to use instead of the restored ones (a sharded fit
        passes its own global arrays); ``place``: puts the other (replicated) arrays where the loop wants them.
        """
        import jax.numpy as jnp

        from jsnmf.kernels.fit import FitState, Momentum
        from jsnmf.kernels.steps import Statistics

        place = place or jnp.array
        G = jnp.array(self.G) if G is None else G
        if best_G is None:
            best_G = jnp.array(self.G if self.best_G is None else self.best_G)
        momentum = None
        if self.momentum is not None:
            momentum = Momentum(**{name: (jnp.array(value) if momentum_G is None else momentum_G) if name == "G"
                                   else place(np.asarray(value, np.float32)) for name, value in self.momentum.items()})
        return FitState(momentum=momentum,
            F=place(self.best_F), G=G,
            stats=Statistics(place(self.XtG), place(self.GtG), place(np.asarray(self.PG, np.float32))),
            best_F=place(self.best_F), best_G=best_G,
            best_loss=place(np.float32(self.best_loss)), reference_loss=place(np.float32(self.reference_loss)),
            since_improvement=place(np.int32(self.since_improvement)), iteration=place(np.int32(self.iteration)),
            done=place(np.asarray(self.is_done(patience=patience, max_iter=max_iter))))

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> "FitProgress":
        best_is_current = bool(np.asarray(tree["best_is_current"]))
        row_blocks = np.asarray(tree["row_blocks"]) if "row_blocks" in tree else None
        return cls(
            G=_real_rows(np.asarray(tree["G"]), row_blocks),
            best_G=None if best_is_current else _real_rows(np.asarray(tree["best_G"]), row_blocks),
            XtG=np.asarray(tree["XtG"]),
            GtG=np.asarray(tree["GtG"]),
            PG=np.asarray(tree["PG"]),
            best_F=np.asarray(tree["best_F"]),
            best_loss=float(np.asarray(tree["best_loss"])),
            reference_loss=float(np.asarray(tree["reference_loss"])),
            since_improvement=int(np.asarray(tree["since_improvement"])),
            iteration=int(np.asarray(tree["iteration"])),
            sq_norm_X=float(np.asarray(tree["sq_norm_X"])),
            loss_history=np.asarray(tree["loss_history"], np.float32).reshape(-1),
            momentum={name[len(MOMENTUM):]: _real_rows(np.asarray(value), row_blocks) if name == f"{MOMENTUM}G"
                      else np.asarray(value) for name, value in tree.items() if name.startswith(MOMENTUM)} or None,
        )


MOMENTUM = "momentum_"  # the prefix of the momentum's arrays in a checkpoint


def row_blocks(layout) -> np.ndarray:
    """``FitProgress.row_blocks`` of a :class:`~jsnmf.distributed.RowLayout`: each process's real and held rows."""
    return np.array([[rows, len(positions) * layout.shard_rows]
                     for rows, positions in zip(layout.rows_per_process, layout.positions)])


def _real_rows(G: np.ndarray, row_blocks: np.ndarray | None) -> np.ndarray:
    """The real rows of codes saved in a sharded layout (each process's rows, then its padding)."""
    if row_blocks is None or len(row_blocks) == 0:
        return G
    if int(np.sum(row_blocks[:, 1])) != G.shape[0]:
        raise ValueError(f"codes of {G.shape[0]} rows do not match the recorded layout {row_blocks.tolist()}")
    starts = np.concatenate([[0], np.cumsum(row_blocks[:, 1])[:-1]])
    if all(int(rows) == int(held) for rows, held in row_blocks):
        return G
    return np.concatenate([G[start:start + rows] for start, (rows, _) in zip(starts, row_blocks)])


def completed_steps(directory: str | os.PathLike) -> list[int]:
    """The iterations of the complete checkpoints in ``directory`` (orbax renames a step to its number
    only once it is whole; temporaries carry a suffix)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def _differences(saved: dict, current: dict) -> list[str]:
    return [f"{name} {saved.get(name)!r} (checkpoint) vs {current.get(name)!r} (this fit)"
            for name in IDENTITY if saved.get(name) != current.get(name)]


def host_restore_target(metadata) -> dict[str, np.ndarray]:
    """A restore target of host arrays shaped like the saved arrays' metadata."""
    # np.empty: only the shapes and dtypes matter; untouched pages cost no memory.
    return {name: np.empty(tuple(leaf.shape), np.dtype(leaf.dtype)) for name, leaf in dict(metadata).items()}


class FitCheckpointer:
    """Saves a fit's state every ``every`` iterations into ``directory`` and finds the one to resume.

    ``resume=False`` refuses a directory that already holds checkpoints (so a finished run is never
    overwritten by accident); ``resume=True`` continues from its latest complete step, or starts
    afresh when it has none. A checkpoint of another problem (``IDENTITY``) raises ValueError.
    """

    def __init__(self, directory: str | os.PathLike, problem: dict, *, every: int, max_to_keep: int,
                 resume: bool):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).expanduser().absolute()
        self.problem = problem
        self.every = int(every)
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"checkpoint_dir {self.directory} exists and is not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(max_to_keep), create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=True,
        )
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "problem": ocp.JsonCheckpointHandler()})
        steps = self.manager.all_steps()
        problem_path = self.directory / PROBLEM_FILE
        try:
            if steps and not resume:
                raise ValueError(
                    f"checkpoint_dir {self.directory} already holds checkpoints (iterations {sorted(steps)}) "
                    "of an earlier fit: pass resume=True to continue it, or use an empty directory")
            if steps and problem_path.is_file():
                saved = read_manifest(problem_path, format=FORMAT, version=FORMAT_VERSION, what="jsnmf fit checkpoint")
                self._check_identity(saved, problem_path)
        except BaseException:
            self.manager.close()
            raise
        atomic_write_json(problem_path, problem, private=True)
        self._saved: set[int] = set(steps)

    def _check_identity(self, saved: dict, where: Path | str) -> None:
        check_manifest(saved, where, format=FORMAT, version=FORMAT_VERSION, what="jsnmf fit checkpoint")
        differences = _differences(saved, self.problem)
        if differences:
            raise ValueError(
                f"checkpoint_dir {self.directory} holds a checkpoint of a different problem: "
                + "; ".join(differences) + ". Use another checkpoint_dir for this fit.")

    def restore_latest(self) -> FitProgress | None:
        """The state of the latest complete checkpoint, or None when there is none."""
        step = self.manager.latest_step()
        if step is None:
            return None
        ocp = self._ocp
        # Restore every array to host memory whatever devices wrote it, so that a fit resumes on
        # another mesh (or none); each process reads the whole codes and keeps its own rows.
        saved = self.manager.item_metadata(step).state
        target = host_restore_target(saved)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), problem=ocp.args.JsonRestore()))
        self._check_identity(dict(restored.problem), self.directory / str(step))
        check_digests(dict(restored.state), dict(restored.problem).get("checksums") or {}, self.directory / str(step))
        progress = FitProgress.from_tree(dict(restored.state))
        n, k, d = self.problem["n_tokens"], self.problem["rank"], self.problem["d_mlp"]
        expected = {"G": (n, k), "XtG": (d, k), "GtG": (k, k), "best_F": (d, k),
                    "loss_history": (progress.iteration,)}
        for name, shape in expected.items():
            if tuple(np.shape(getattr(progress, name))) != shape:
                raise ValueError(f"{self.directory / str(step)}: array {name} has shape "
                                 f"{np.shape(getattr(progress, name))}, expected {shape}")
        if progress.momentum is not None and np.shape(progress.momentum.get("G")) != (n, k):
            raise ValueError(f"{self.directory / str(step)}: array {MOMENTUM}G has shape "
                             f"{np.shape(progress.momentum.get('G'))}, expected {(n, k)}")
        if progress.best_G is not None and progress.best_G.shape != (n, k):
            raise ValueError(f"{self.directory / str(step)}: array best_G has shape {progress.best_G.shape}, "
                             f"expected {(n, k)}")
        return progress

    def due(self, iteration: int) -> bool:
        """Whether the interval asks for a checkpoint after ``iteration`` iterations."""
        return iteration > 0 and iteration % self.every == 0 and iteration not in self._saved

    def next_boundary(self, iteration: int) -> int:
        """The next iteration count after ``iteration`` at which a checkpoint is due."""
        return (iteration // self.every + 1) * self.every

    def save(self, progress: FitProgress) -> None:
        """Save ``progress`` as step ``progress.iteration`` (in the background; a step saved already is kept)."""
        if progress.iteration in self._saved or progress.iteration == 0:
            return
        ocp = self._ocp
        tree = progress.to_tree()
        _check_savable(tree, self.directory / str(progress.iteration))
        with _interrupts_deferred():  # a Ctrl-C during the save is raised once orbax has it in hand
            before = _orbax_threads()
            try:
                # orbax copies NumPy arrays before save() returns, so the caller may overwrite its buffers.
                described = {**self.problem, "checksums": array_digests(tree)}
                self.manager.save(progress.iteration, force=True, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(tree), problem=ocp.args.JsonSave(described)))
            except BaseException:
                _release_orbax_threads(_orbax_threads() - before)
                raise
            self._saved.add(progress.iteration)

    def close(self) -> None:
        """Wait for the background save to finish and release the manager (also when the wait fails)."""
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()

    def __enter__(self) -> "FitCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- a save that fails or is interrupted


def _check_savable(tree: dict, where: Path) -> None:
    """orbax refuses empty arrays only after it has started its background threads; refuse them first."""
    empty = [name for name, value in tree.items() if np.size(value) == 0]
    if empty:
        raise ValueError(f"{where}: cannot checkpoint empty array(s) {empty}")


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold back SIGINT (Ctrl-C) while orbax starts a save, and deliver it right after.

    A KeyboardInterrupt raised inside ``CheckpointManager.save`` leaves orbax threads waiting for
    signals that never come, and the process never exits. Only the main thread receives signals.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


def _orbax_threads() -> set[threading.Thread]:
    """orbax's background threads that wait for signals of a save before they run."""
    return {thread for thread in threading.enumerate()
            if hasattr(thread, "cancel") and hasattr(thread, "_receive_signals")}


def _release_orbax_threads(threads: set[threading.Thread]) -> None:
    """Cancel the background threads of a save that failed and wake them, so that they end now.

    They wait (for about half an hour) for a signal from the part of the save that failed, and the
    interpreter waits for them at exit. Best effort: an orbax without these internals is left as is.
    """
    try:
        from orbax.checkpoint._src.futures.future import set_signals
    except ImportError:
        return
    for thread in threads:
        try:
            thread.cancel()
            set_signals(thread._receive_signals, operation_id=thread._operation_id)
        except Exception:  # noqa: BLE001 - best effort; the original error is what matters
            pass

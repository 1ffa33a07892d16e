"""The one fit driver: every way of fitting runs this loop over a data backend.

A backend (:mod:`jsnmf.fit.arrays`, :mod:`jsnmf.fit.stream`) knows where the rows of ``X`` live and
how to run iterations on them; the driver owns everything else:

- the start: a fresh state (``backend.start``: the initializer's pass) or the latest checkpoint
  (``backend.restore``), so every backend resumes the same way;
- the loop: ``backend.run(state, stop_at)`` runs iterations (compiled blocks, or one streamed pass)
  until the stopping rule fires or ``stop_at`` (the next checkpoint boundary) is reached;
- the loss history, the progress bar (iterations, relative error, tokens/s; process 0 only);
- the checkpoint cadence: ``backend.checkpoint(state, losses)`` is saved when due and at the end.

A backend provides::

    n_tokens                          tokens per pass (for tokens/s)
    sq_norms                          ‖X‖² per fit, shape (layers,) (for the relative error shown)
    start(status) -> state            status(text) shows what a long start is doing
    restore(progress) -> state        from a jsnmf.checkpoint.FitProgress
    run(state, stop_at) -> (state, losses)   losses (block,) or (layers, block), nan past the end
    iteration(state) -> int           iterations done (the most over layers)
    done(state) -> bool               the stopping rule holds (for every layer)
    checkpoint(state, losses) -> FitProgress   (single fits; only called with a checkpointer)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

__all__ = ["FitResult", "NonFiniteError", "drive", "fit", "progress_bar"]


@dataclass
class FitResult:
    """What one fit produces; :meth:`jsnmf.SNMF.set_fitted` copies it into the estimator."""

    features: np.ndarray  # F (d × k), the best iterate
    codes: np.ndarray  # G (n × k) of the best iterate: this process's rows (an np.memmap when on disk)
    loss_history: np.ndarray  # the loss after each iteration
    n_iter: int
    best_loss: float
    sq_norm_X: float
    n_features_in: int
    seconds: float
    tokens_per_second: float = float("nan")


def drive(backend, *, max_iter: int, progress: bool, checkpointer=None) -> tuple[Any, np.ndarray]:
    """Run ``backend`` from a fresh start or ``checkpointer``'s latest checkpoint until it is done.

    Returns the final state and the loss history: the losses before a resume, then those of every
    block, concatenated along the last axis (``nan`` where a fit ran no iteration).
    """
    with progress_bar(progress and jax.process_index() == 0, max_iter) as bar:
        def status(text: str) -> None:
            if bar is not None:
                bar.set_postfix_str(text)

        restored = checkpointer.restore_latest() if checkpointer is not None else None
        if restored is None:
            state, blocks = backend.start(status), []
        else:
            status("restoring")
            state, blocks = backend.restore(restored), [np.asarray(restored.loss_history, np.float32)]
        sq_norms = np.asarray(backend.sq_norms, np.float64).reshape(-1)
        check_finite_norms(sq_norms)  # before any iteration, so no checkpoint of garbage is written
        if bar is not None:
            bar.update(backend.iteration(state))
        while not backend.done(state):
            iteration = backend.iteration(state)
            stop_at = max_iter if checkpointer is None else checkpointer.next_boundary(iteration)
            started = time.perf_counter()
            state, losses = backend.run(state, stop_at)
            losses = np.asarray(losses, np.float32)
            check_finite_losses(losses, backend.iteration(state) - iteration, iteration)
            blocks.append(losses)
            ran = np.sum(~np.isnan(losses.reshape(-1, losses.shape[-1])), axis=1)
            if bar is not None and ran.max() > 0:
                bar.update(int(ran.max()))
                last = [row[n - 1] / sq for row, n, sq in zip(losses.reshape(len(ran), -1), ran, sq_norms) if n]
                bar.set_postfix({"rel_err": f"{math.sqrt(max(max(last), 0)):.4f}",
                                 "tok_s": f"{backend.n_tokens * ran.max() / (time.perf_counter() - started):.3g}"})
            if checkpointer is not None:
                if backend.done(state) or checkpointer.due(backend.iteration(state)):
                    history = np.concatenate(blocks)
                    checkpointer.save(backend.checkpoint(state, history[~np.isnan(history)]))
    if not blocks:
        return state, np.zeros((len(sq_norms), 0) if np.ndim(backend.sq_norms) else (0,), np.float32)
    return state, np.concatenate(blocks, axis=-1)


class NonFiniteError(ValueError):
    """The data or the iterates left the finite range of the fit's precision."""


def check_finite_norms(sq_norms: np.ndarray) -> None:
    """‖X‖² must be finite: an infinite or NaN sum means X holds non-finite values or values whose
    squares overflow the precision (float32 above about 1.8e19 per entry; float16 above 65,504)."""
    bad = [i for i, value in enumerate(sq_norms) if not np.isfinite(value)]
    if bad:
        which = "X" if len(sq_norms) == 1 else f"X of fit(s) {bad}"
        raise NonFiniteError(
            f"the sum of squares of {which} is {sq_norms[bad[0]]}: X holds non-finite values, or values too "
            "large for the fit's dtype (float32 overflows when |X| reaches about 1.8e19, float16 above "
            "65,504); rescale X (for example divide by its largest |value|) or fit in float32")


def check_finite_losses(losses: np.ndarray, advanced: int, start: int) -> None:
    """Every loss of an iteration that ran must be finite (``nan`` past a fit's end is padding)."""
    rows = losses.reshape(-1, losses.shape[-1])
    # Infinities are never padding; a nan followed by a number in one fit's row is not padding either.
    ran = rows[:, :advanced] if rows.shape[0] == 1 else rows
    finite = np.isfinite(ran)
    padding = np.isnan(ran) & ~np.flip(np.logical_or.accumulate(np.flip(finite, -1), -1), -1)
    bad = ~finite & ~(padding if rows.shape[0] > 1 else np.zeros_like(finite))
    if bad.any():
        fit_index, position = (int(i[0]) for i in np.nonzero(bad))
        where = f" (fit {fit_index})" if rows.shape[0] > 1 else ""
        raise NonFiniteError(
            f"the loss became {ran[fit_index, position]} at iteration {start + position + 1}{where}: the "
            "factors left the finite range of the fit's dtype; rescale X (for example divide by its "
            "largest |value|), lower the sparsity or fit in float32")


def fit(backend, *, max_iter: int, progress: bool, checkpointer=None) -> list[FitResult]:
    """:func:`drive` ``backend`` to the end and return its results (one per fit; several when batched).

    Closes ``checkpointer`` (waiting for its last save) and ``backend`` whatever happens.
    """
    started = time.perf_counter()
    try:
        state, history = drive(backend, max_iter=max_iter, progress=progress, checkpointer=checkpointer)
        return backend.results(state, history, time.perf_counter() - started)
    finally:
        try:
            if checkpointer is not None:
                checkpointer.close()
        finally:
            backend.close()


class progress_bar:
    """A tqdm bar when ``enabled``, else nothing (usable in a ``with``)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self):
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc="SNMF", unit="it", leave=False)
        return self.bar

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False

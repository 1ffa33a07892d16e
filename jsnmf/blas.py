"""Keep the CPU LAPACK from fighting XLA for the cores while the engine runs.

On the CPU, jaxlib's linear-algebra kernels (the k×k Cholesky of the ``F`` update) call the
OpenBLAS that ships with SciPy. Its worker threads compete with XLA's own thread pool, and each
small solve then waits milliseconds for them: at k=32 the solve took 12 ms instead of 0.09 ms, a
4× slowdown of a whole iteration (measured on 2 cores). The engine's methods run with that
OpenBLAS limited to one thread, for their duration only.
"""

from __future__ import annotations

import functools


def single_threaded_lapack(method):
    """Decorator: run ``method`` with the loaded BLAS/LAPACK thread pools limited to one thread."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        import scipy.linalg.cython_lapack  # noqa: F401  the LAPACK jaxlib calls; load it so it can be limited
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"):
            return method(*args, **kwargs)

    return wrapper

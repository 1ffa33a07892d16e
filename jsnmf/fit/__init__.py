"""The fit layer: one driver (:mod:`jsnmf.fit.loop`) over interchangeable data backends.

- :mod:`jsnmf.fit.loop` — the driver: start or resume, run blocks of iterations, progress bar,
  loss history, checkpoint cadence. The only loop; it knows nothing of where the rows live.
- :mod:`jsnmf.fit.arrays` — ``X`` held on the device(s): one device, row-sharded on a mesh (also
  across processes), and several layers at once as a batch axis.
- :mod:`jsnmf.fit.stream` — ``X`` streamed from a store or array chunk by chunk (:mod:`jsnmf.io`).
- :mod:`jsnmf.fit.starts` — the initial factors ``(F0, G0)`` of the array backends.

The stopping rule is :func:`jsnmf.kernels.fit.stopping_update`, used by every backend. See
docs/architecture.md.
"""

"""Host I/O, apart from the algorithm: atomic files, manifests, and the sources, prefetch and host
buffers that feed a streamed fit (see docs/architecture.md)."""

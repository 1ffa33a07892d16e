"""ActivationStore: MLP activations on disk, chunked by tokens, with per-token metadata.

Layout of a store directory::

    manifest.json              format name/version, layers, dtype, d_mlp, committed chunks, run metadata
    documents.jsonl            the corpus texts (and labels), one JSON object per line, in order
    layer_{L:02d}/chunk_{i:06d}.npy   activations X[start:stop] of layer L, shape (stop-start, d_mlp)
    tokens/chunk_{i:06d}.npy   int32 (stop-start, 4): token_id, doc_index, position, label_index

Every layer shares the same token chunks ``[start, stop)`` (``store.chunk_bounds``); all chunks
hold ``chunk_tokens`` tokens except the last, so a jit-compiled consumer sees one shape (two
with the tail). Rows are tokens in document order (padding and, by default, BOS removed).

Why NumPy ``.npy`` chunk files (and not zarr or tensorstore):

- **Atomic commit is simple.** A chunk is written to temporary names, fsynced and moved into
  place with ``os.replace``; only then is the manifest (also written atomically) updated to
  list it. A kill at any moment leaves the manifest describing whole chunks only; files of a
  chunk that was being written when the process died are deleted when the writer resumes.
  zarr/tensorstore write chunk files in place and keep array-level metadata that would still
  have to be kept consistent with our own progress record.
- **No extra dependency.** NumPy reads the files; bfloat16 is stored as its uint16 bits (the
  manifest's ``dtype`` says how to read them back, via ``ml_dtypes.bfloat16``, which JAX ships).
- **Many readers at once.** ``np.load(mmap_mode="r")`` maps one chunk at a time read-only,
  so any number of processes (e.g. one per host of a sharded fit) can stream the store
  concurrently, and the OS page cache is shared between them. One file per (layer, chunk)
  lets a reader touch only the layer it fits.

Integrity: the manifest's ``checksums`` maps each committed chunk file (``layer_00/chunk_000000.npy``,
``tokens/...``) to the sha256 of its bytes, recorded when the chunk is committed. A reader verifies a
chunk the first time this process reads it (a verified file is remembered by inode, size and mtime,
so a streamed fit hashes each chunk once, not once per pass) and raises ValueError naming the file on
a mismatch. A chunk file that is a symbolic link resolving outside the store is refused. Stores
written before checksums were recorded (no ``checksums`` key) still open; their chunks are checked
for shape, dtype and size only.

One writer at a time holds an advisory lock (``.lock``, ``fcntl.flock``); the OS drops it
when the process dies, so a killed extraction can be resumed at once.
"""

from jsnmf.dtypes import DTYPES
from jsnmf.layout import hook_name
from jsnmf.store.format import FORMAT_NAME, FORMAT_VERSION, MANIFEST, check_dtype, verify_file
from jsnmf.store.reader import ActivationStore
from jsnmf.store.writer import StoreWriter, remove_store

__all__ = [
    "ActivationStore", "StoreWriter", "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST", "DTYPES", "hook_name",
    "check_dtype", "remove_store", "verify_file",
]

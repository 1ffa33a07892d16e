"""Hardening (issue 13): no hangs, integrity-checked files, one clean error, no leftovers, one fit per run.

The hang cases run in a subprocess under a generous timeout (a hang is forever, a clean exit takes
seconds) and assert a prompt, clean exit.
"""

import os
import subprocess
import sys
import textwrap

import pytest

HANG_TIMEOUT_S = 120  # a busy 2-core machine imports JAX and fits in well under this; a hang is forever


def run_script(script: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the process hung (no exit within {HANG_TIMEOUT_S} s): {str(err.stderr)[-2000:]}")


# ---------------------------------------------------------------- 1: an interrupted checkpoint save exits


INTERRUPTED_SAVE = """
    import os, signal, sys
    import numpy as np
    import orbax.checkpoint as ocp
    from jsnmf import SNMF

    directory, how = sys.argv[1], sys.argv[2]
    # Ctrl-C raises, as in a terminal, also when the tests run as a background job (which starts with
    # SIGINT ignored, inherited by this process: then jsnmf rightly drops the interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    original = ocp.StandardCheckpointHandler.async_save

    def async_save(self, *args, **kwargs):  # orbax is inside CheckpointManager.save, threads started
        if how == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
        elif how == "raise":
            raise KeyboardInterrupt
        else:
            raise OSError(28, "No space left on device")
        return original(self, *args, **kwargs)

    ocp.StandardCheckpointHandler.async_save = async_save
    X = np.abs(np.random.default_rng(0).standard_normal((64, 16))).astype("f4")
    try:
        SNMF(4, max_iter=5).fit(X, checkpoint_dir=directory, checkpoint_every=1)
    except BaseException as err:
        print("raised", type(err).__name__, flush=True)
"""


@pytest.mark.parametrize("how", ["sigint", "raise", "oserror"])
def test_interrupted_or_failed_checkpoint_save_exits_promptly(tmp_path, how):
    result = run_script(INTERRUPTED_SAVE, tmp_path / "ck", how)
    expected = "OSError" if how == "oserror" else "KeyboardInterrupt"
    assert result.returncode == 0 and f"raised {expected}" in result.stdout, result.stderr[-3000:]
    assert "cannot schedule new futures" not in result.stderr
    if how == "sigint":  # Ctrl-C is delivered once orbax holds the save: that checkpoint completes
        assert (tmp_path / "ck" / "1").is_dir()


# ---------------------------------------------------------------- 6: SNMF.load checks its manifest


@pytest.fixture(scope="module")
def saved_snmf(tmp_path_factory):
    import numpy as np

    from jsnmf import SNMF

    X = np.abs(np.random.default_rng(0).standard_normal((40, 12))).astype("f4")
    path = tmp_path_factory.mktemp("snmf") / "ck"
    SNMF(4, max_iter=3).fit(X).save(path)
    return path


def _edited_copy(saved, tmp_path, edit):
    import json
    import shutil

    path = tmp_path / "ck"
    shutil.copytree(saved, path)
    manifest_file = path / "manifest.json"
    edit(manifest_file, json.loads(manifest_file.read_text()))
    return path


def _write(file, value):
    import json

    file.write_text(json.dumps(value))


def _with(key_path, value):
    def edit(file, manifest):
        target = manifest
        for key in key_path[:-1]:
            target = target[key]
        target[key_path[-1]] = value
        _write(file, manifest)
    return edit


def _without(key):
    def edit(file, manifest):
        del manifest[key]
        _write(file, manifest)
    return edit


@pytest.mark.parametrize("edit, message", [
    (_with(("params", "rank"), 7), "rank 7 does not match"),
    (_with(("shapes",), {}), "'shapes' names []"),
    (_with(("shapes", "codes"), [40]), "shape of 'codes'"),
    (_without("format_version"), "format version None"),
    (_with(("format_version",), 0), "format version 0"),
    (lambda file, m: _write(file, [m]), "not a jsnmf SNMF checkpoint"),
    (lambda file, m: file.write_bytes(b"\x89PNG\xff\xfe\x00garbage"), "unreadable manifest"),
    (_without("params"), "missing ['params']"),
    (_with(("params",), []), "'params' is a list"),
    (_with(("n_iter",), "3"), "'n_iter' is a string"),
    (_with(("params", "solver"), "adam"), "params are not valid"),
])
def test_load_refuses_an_edited_manifest_with_one_clear_error(saved_snmf, tmp_path, edit, message):
    from jsnmf import SNMF

    path = _edited_copy(saved_snmf, tmp_path, edit)
    with pytest.raises(ValueError) as err:
        SNMF.load(path)
    assert message in str(err.value) and str(path) in str(err.value)


# ---------------------------------------------------------------- helpers: a tiny store, the CLI


def make_store(path, *, layers=(0, 1), n=48, d=8, chunk=16, scale=1.0, seed=0):
    import numpy as np

    from jsnmf.store import ActivationStore

    rng = np.random.default_rng(seed)
    writer = ActivationStore.create(path, layers=list(layers), d_mlp=d, dtype="float32", chunk_tokens=chunk,
                                    documents=["a b c"] * 4)
    acts = {layer: (np.minimum(np.abs(rng.standard_normal((n, d))), 1.1) * scale).astype("f4") for layer in layers}
    zeros = np.zeros(n, np.int32)
    writer.append(acts, np.arange(n, dtype=np.int32), zeros, np.arange(n, dtype=np.int32), zeros - 1)
    return writer.close()


def run_cli(capsys, *argv):
    from jsnmf.cli import main

    code = main(["--quiet", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("jsnmf: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]


# ---------------------------------------------------------------- 5: integrity of store chunks


def _flip_bytes(file, offset_from_end=40, count=8):
    data = bytearray(file.read_bytes())
    for i in range(len(data) - offset_from_end, len(data) - offset_from_end + count):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


def test_flipped_bytes_in_a_store_chunk_are_caught_naming_the_file(tmp_path):
    from jsnmf.store import ActivationStore

    store = make_store(tmp_path / "store")
    assert len(store.manifest["checksums"]) == 3 * 3  # (2 layers + tokens) × 3 chunks
    file = store.chunk_path(1, 2)
    _flip_bytes(file)
    store = ActivationStore.open(tmp_path / "store")
    store.read(0)  # the other layer is intact
    with pytest.raises(ValueError, match="checksum mismatch") as err:
        store.read(1)
    assert str(file) in str(err.value)
    with pytest.raises(ValueError, match="checksum mismatch"):
        store.locate(1, 32, 48)  # the streamed fit's path


def test_a_store_without_checksums_still_opens(tmp_path):
    import json

    from jsnmf.store import ActivationStore

    store = make_store(tmp_path / "store")
    manifest = json.loads((store.path / "manifest.json").read_text())
    del manifest["checksums"]
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    X = ActivationStore.open(store.path).read(0)
    assert X.shape == (48, 8)


def test_a_chunk_linked_outside_the_store_is_refused(tmp_path):
    from jsnmf.store import ActivationStore

    store = make_store(tmp_path / "store")
    other = make_store(tmp_path / "other", seed=1)
    file = store.chunk_path(0, 1)
    file.unlink()
    file.symlink_to(other.chunk_path(1, 1))
    with pytest.raises(ValueError, match="outside the store") as err:
        ActivationStore.open(store.path)
    assert str(file) in str(err.value)


def test_verified_chunks_are_hashed_once_per_process(tmp_path, monkeypatch):
    import hashlib

    import jsnmf.store.format

    store = make_store(tmp_path / "store")
    calls = []
    real = hashlib.file_digest
    monkeypatch.setattr(jsnmf.store.format.hashlib, "file_digest", lambda f, name: calls.append(f.name) or real(f, name))
    for _ in range(3):
        store.read(0)
    assert len(calls) == 3  # three chunks, hashed on the first pass only


# ---------------------------------------------------------------- 7: one clean error from the CLI


def test_store_errors_are_one_line_naming_the_file(capsys, tmp_path):
    import json

    store = make_store(tmp_path / "run" / "store")
    file = store.chunk_path(0, 1)
    file.write_bytes(file.read_bytes()[:-100])  # truncated
    code, _, err = run_cli(capsys, "fit", "--store", store.path, "--rank", "2", "--max-iter", "2")
    assert_one_error_line(code, err, file)

    manifest_file = store.path / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    del manifest["checksums"]  # an old store: the truncation is still caught, and named
    manifest_file.write_text(json.dumps(manifest))
    code, _, err = run_cli(capsys, "fit", "--store", store.path, "--rank", "2", "--max-iter", "2")
    assert_one_error_line(code, err, file, "truncated")

    manifest["chunks"] = None
    manifest_file.write_text(json.dumps(manifest))
    code, _, err = run_cli(capsys, "fit", "--store", store.path, "--rank", "2")
    assert_one_error_line(code, err, "'chunks' is null", store.path)


def test_fit_errors_are_one_line(capsys, tmp_path):
    store = make_store(tmp_path / "run" / "store")
    code, _, err = run_cli(capsys, "fit", "--store", store.path, "--rank", "2", "--seed", str(2**70))
    assert_one_error_line(code, err, "seed must be an integer")
    huge = make_store(tmp_path / "huge" / "store", scale=3e38)
    code, _, err = run_cli(capsys, "fit", "--store", huge.path, "--rank", "2", "--max-iter", "3")
    assert_one_error_line(code, err, "sum of squares")


def test_unwritable_output_and_a_full_disk_are_one_line_naming_the_file(capsys, tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    store = make_store(tmp_path / "run" / "store")
    real_mkdir = Path.mkdir

    def no_permission(self, *args, **kwargs):
        if "snmf" in self.parts:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", no_permission)
    code, _, err = run_cli(capsys, "fit", "--store", store.path, "--rank", "2", "--max-iter", "2")
    assert_one_error_line(code, err, "Permission denied", tmp_path / "run" / "snmf")
    monkeypatch.undo()

    import jsnmf.io.files

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jsnmf.io.files.os, "fsync", full_disk)
    code, _, err = run_cli(capsys, "fit", "--store", store.path, "--rank", "2", "--max-iter", "2")
    monkeypatch.undo()
    assert_one_error_line(code, err, "No space left on device", tmp_path / "run" / "snmf")
    leftovers = [p for p in (tmp_path / "run").rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]
    assert leftovers == []


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from jsnmf import demo

    return demo.build_demo_model(tmp_path_factory.mktemp("hardening") / "model")


def _model_copy(model_dir, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    return copy


def test_bad_corpora_are_one_line(capsys, model_dir, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = run_cli(capsys, "extract", "--model", model_dir, "--corpus", deep, "--layers", "0",
                           "--out", tmp_path / "run1")
    assert_one_error_line(code, err, deep, "nested too deeply")
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"text": "a lone \\ud800 surrogate"}\n')
    code, _, err = run_cli(capsys, "extract", "--model", model_dir, "--corpus", surrogate, "--layers", "0",
                           "--out", tmp_path / "run2")
    assert_one_error_line(code, err, surrogate, "surrogate")


@pytest.mark.parametrize("damage, fragment", [
    ("config_list", "expected a JSON object"),
    ("n_head_0", "n_head must be a positive integer"),
    ("safetensors_dir", "not a regular file"),
])
def test_bad_models_are_one_line(capsys, model_dir, tmp_path, damage, fragment):
    import json

    model = _model_copy(model_dir, tmp_path)
    config = json.loads((model / "config.json").read_text())
    if damage == "config_list":
        (model / "config.json").write_text(json.dumps([config]))
    elif damage == "n_head_0":
        (model / "config.json").write_text(json.dumps(dict(config, n_head=0)))
    else:
        (model / "model.safetensors").unlink()
        (model / "model.safetensors").mkdir()
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n")
    code, _, err = run_cli(capsys, "extract", "--model", model, "--corpus", corpus, "--layers", "0",
                           "--out", tmp_path / "run")
    assert_one_error_line(code, err, fragment, model)


# ---------------------------------------------------------------- 10, 11: leftovers and one fit per run folder


def test_a_fit_failing_before_its_first_checkpoint_leaves_nothing_behind(capsys, tmp_path):
    huge = make_store(tmp_path / "run" / "store", scale=3e38)  # fails after the checkpoint folder is made
    code, _, err = run_cli(capsys, "fit", "--store", huge.path, "--rank", "2", "--max-iter", "3")
    assert_one_error_line(code, err, "sum of squares")
    assert not (tmp_path / "run" / "snmf" / "layer_00.fitting").exists()


def test_an_interrupted_layer_is_refused_before_any_layer_is_fitted(capsys, tmp_path):
    store = make_store(tmp_path / "run" / "store")
    (tmp_path / "run" / "snmf" / "layer_00.fitting" / "4").mkdir(parents=True)  # a complete checkpoint
    code, _, err = run_cli(capsys, "fit", "--store", store.path, "--layers", "1,0", "--rank", "2", "--max-iter", "2")
    assert_one_error_line(code, err, "layer 0 has an interrupted fit")
    assert not (tmp_path / "run" / "snmf" / "layer_01").exists()


def test_two_fits_on_one_run_folder_are_locked_out(capsys, tmp_path):
    store = make_store(tmp_path / "run" / "store")
    script = """
        import sys, time
        from pathlib import Path
        from jsnmf.io.files import FolderLock
        snmf = Path(sys.argv[1]); snmf.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(snmf, busy="busy")  # what a running `jsnmf fit` holds
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(tmp_path / "run" / "snmf"), "300"],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_cli(capsys, "fit", "--store", store.path, "--rank", "2", "--max-iter", "2")
        assert_one_error_line(code, err, "another jsnmf fit is running", tmp_path / "run" / "snmf")
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run_cli(capsys, "fit", "--store", store.path, "--rank", "2", "--max-iter", "2")
    assert code == 0, err  # the lock went with the process


# ---------------------------------------------------------------- 5: integrity of checkpoints


def _largest_file(directory):
    files = [p for p in directory.rglob("*") if p.is_file() and "metadata" not in p.name]
    return max(files, key=lambda p: p.stat().st_size)


def test_flipped_bytes_in_a_saved_codes_array_are_caught(tmp_path):
    import json

    import numpy as np

    from jsnmf import SNMF
    from jsnmf.io.digests import array_digest

    X = np.abs(np.random.default_rng(0).standard_normal((2000, 12))).astype("f4")
    path = SNMF(4, max_iter=2).fit(X).save(tmp_path / "ck")  # codes: 32 kB, the rest < 1 kB
    loaded = SNMF.load(path)

    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["checksums"]["codes"] == array_digest(np.asarray(loaded.codes_, np.float32))
    # The codes are the largest array; flip 8 bytes in the file that holds them.
    _flip_bytes(_largest_file(path / "arrays"), offset_from_end=400)
    with pytest.raises(ValueError) as err:
        SNMF.load(path)
    assert str(path) in str(err.value)


def test_a_changed_array_in_a_fit_checkpoint_is_caught(tmp_path):
    import numpy as np

    from jsnmf import SNMF

    X = np.abs(np.random.default_rng(0).standard_normal((64, 12))).astype("f4")
    SNMF(3, max_iter=4).fit(X, checkpoint_dir=tmp_path / "ck", checkpoint_every=2)
    problem_file = tmp_path / "ck" / "4" / "problem" / "metadata"
    import json

    described = json.loads(problem_file.read_text())
    assert set(described["checksums"]) >= {"G", "XtG", "best_F", "loss_history"}
    described["checksums"]["G"] = "0" * 64  # as if G had changed on disk
    problem_file.write_text(json.dumps(described))
    with pytest.raises(ValueError, match="'G' does not match the checksum") as err:
        SNMF(3, max_iter=6).fit(X, checkpoint_dir=tmp_path / "ck", resume=True, checkpoint_every=2)
    assert str(tmp_path / "ck" / "4") in str(err.value)


# ---------------------------------------------------------------- 12: no temporaries left by a full disk


def test_a_failed_save_leaves_no_staging_folder_and_stale_ones_are_removed(saved_snmf, tmp_path, monkeypatch):
    import errno

    import jsnmf.io.files
    from jsnmf import SNMF

    model = SNMF.load(saved_snmf)
    dead = tmp_path / f".ck.tmp-{2**22 + 12345}"  # a pid above the kernel's limit: never alive
    dead.mkdir()
    alive = tmp_path / f".ck.tmp-{os.getppid()}"  # a live writer's staging folder is left alone
    alive.mkdir()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jsnmf.io.files.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left") as err:
        model.save(tmp_path / "ck")
    monkeypatch.undo()
    assert "manifest.json" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name]
    model.save(tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "ck"]


def test_a_failed_store_commit_leaves_no_npy_tmp(tmp_path, monkeypatch):
    import errno

    import jsnmf.io.files

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jsnmf.io.files.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left") as err:
        make_store(tmp_path / "store")
    monkeypatch.undo()
    assert "chunk_000000.npy" in str(err.value) or "documents.jsonl" in str(err.value)
    assert [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")] == []

"""The jsnmf command line: user errors exit 2 with one clear line; extract, fit and report on a store."""

import json

import numpy as np
import pytest

from jsnmf import demo
from jsnmf.cli import main
from jsnmf.report import read_features


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return demo.build_demo_model(tmp_path_factory.mktemp("cli") / "model")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    records = demo.read_demo_corpus()[:60]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_cli(capsys, *argv):
    code = main(["--quiet", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("jsnmf: error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


# ---------------------------------------------------------------- user errors


def test_missing_corpus_file(capsys, model_dir, tmp_path):
    code, _, err = run_cli(capsys, "run", "--model", model_dir, "--corpus", tmp_path / "nope.txt",
                           "--layers", "0", "--out", tmp_path / "run")
    assert_user_error(code, err, "corpus file not found", "nope.txt")
    code, _, err = run_cli(capsys, "extract", "--model", model_dir, "--corpus", tmp_path / "nope.txt",
                           "--layers", "0", "--out", tmp_path / "run")
    assert_user_error(code, err, "corpus file not found")


def test_unknown_layer(capsys, model_dir, small_corpus, tmp_path):
    code, _, err = run_cli(capsys, "extract", "--model", model_dir, "--corpus", small_corpus,
                           "--layers", "0,5", "--out", tmp_path / "run")
    assert_user_error(code, err, "5")
    code, _, err = run_cli(capsys, "run", "--layers", "7", "--out", tmp_path / "demo")
    assert_user_error(code, err, "layer(s) [7] do not exist", "2 layers")


def test_bad_numbers_are_argparse_errors(capsys, tmp_path):
    code, _, err = run_cli(capsys, "fit", "--store", tmp_path, "--rank", "0")
    assert_user_error(code, err, "--rank", "must be >= 1")
    code, _, err = run_cli(capsys, "run", "--layers", "a,b")
    assert_user_error(code, err, "--layers", "layer numbers")
    code, _, err = run_cli(capsys, "run", "--sparsity", "2")
    assert_user_error(code, err, "--sparsity", "(0, 1]")
    code, _, err = run_cli(capsys)  # no command
    assert code == 2 and "jsnmf: error:" in err


def test_inconsistent_options(capsys, model_dir, small_corpus, tmp_path):
    code, _, err = run_cli(capsys, "run", "--corpus", small_corpus)
    assert_user_error(code, err, "--corpus needs --model")
    code, _, err = run_cli(capsys, "run", "--model", model_dir, "--corpus", small_corpus)
    assert_user_error(code, err, "--layers")
    code, _, err = run_cli(capsys, "fit", "--store", tmp_path)
    assert_user_error(code, err, "--rank")


def test_not_a_store_and_nothing_fitted(capsys, tmp_path):
    code, _, err = run_cli(capsys, "fit", "--store", tmp_path, "--rank", "4")
    assert_user_error(code, err, "not a jsnmf activation store")
    code, _, err = run_cli(capsys, "report", "--run", tmp_path)
    assert_user_error(code, err, "not a jsnmf activation store")


# ---------------------------------------------------------------- extract, fit, report


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, model_dir, small_corpus):
    run = tmp_path_factory.mktemp("run") / "run"
    assert main(["--quiet", "extract", "--model", str(model_dir), "--corpus", str(small_corpus),
                 "--layers", "0,1", "--out", str(run)]) == 0
    return run


def test_fit_and_report_on_a_store(capsys, extracted):
    run = extracted
    code, _, err = run_cli(capsys, "report", "--run", run)
    assert_user_error(code, err, "no fitted layers")

    code, out, err = run_cli(capsys, "fit", "--store", run / "store", "--layers", "1", "--rank", "4",
                             "--max-iter", "30", "--init", "svd", "--sparsity", "0.05")
    assert code == 0, err
    assert (run / "snmf" / "layer_01" / "manifest.json").is_file()
    assert not (run / "snmf" / "layer_00").exists()
    assert "relative error" in out

    code, _, err = run_cli(capsys, "fit", "--store", run / "store", "--layers", "3", "--rank", "4")
    assert_user_error(code, err, "not in the store")
    code, _, err = run_cli(capsys, "fit", "--store", run / "store", "--rank", "100000")
    assert_user_error(code, err, "rank 100000 exceeds")

    code, out, err = run_cli(capsys, "report", "--run", run)
    assert code == 0, err
    index = run / "report" / "index.html"
    assert f"report: {index}" in out
    assert 'href="layer_01/report.html"' in index.read_text()
    data = read_features(run / "report" / "layer_01" / "features.json")
    assert data["rank"] == 4 and data["layer"] == 1 and len(data["features"]) == 4
    assert data["fit"]["params"]["sparsity"] == 0.05 and data["fit"]["params"]["init"] == "svd"
    assert any(f["vocab_top"] for f in data["features"])  # the store's model was loaded for projections
    assert any(f["label_shares"] for f in data["features"])
    live = [f for f in data["features"] if not f["dead"]]
    # top tokens are active ones, near-duplicate contexts collapsed: at most the active count
    assert live and all(1 <= len(f["top_tokens"]) <= min(25, round(f["density"] * data["n_tokens"])) for f in live)

    code, _, err = run_cli(capsys, "report", "--store", run / "store", "--no-vocab", "--top-k", "5", "--window", "2")
    assert code == 0, err
    data = read_features(run / "report" / "layer_01" / "features.json")
    assert all(f["vocab_top"] == [] and len(f["top_tokens"]) <= 5 for f in data["features"])

    code, _, err = run_cli(capsys, "report", "--run", run, "--layers", "0")
    assert_user_error(code, err, "no checkpoint for layer 0")


def test_module_entry_point_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("extract", "fit", "report", "run"):
        assert command in out


def test_fit_streams_big_stores_with_the_same_result(capsys, extracted, monkeypatch, tmp_path):
    """Layers above the in-memory limit are fitted by streaming the store; the factors agree."""
    import numpy as np

    import jsnmf.cli.steps
    from jsnmf.estimator import SNMF

    args = ("fit", "--store", extracted / "store", "--layers", "0", "--rank", "3", "--max-iter", "15", "--init", "svd")
    assert run_cli(capsys, *args)[0] == 0
    in_memory = SNMF.load(extracted / "snmf" / "layer_00")
    monkeypatch.setattr(jsnmf.cli.steps, "IN_MEMORY_LIMIT_BYTES", 0)
    assert run_cli(capsys, *args)[0] == 0
    streamed = SNMF.load(extracted / "snmf" / "layer_00")
    assert streamed.n_iter_ == in_memory.n_iter_
    np.testing.assert_allclose(streamed.features_, in_memory.features_, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(streamed.codes_, in_memory.codes_, rtol=1e-3, atol=1e-4)


def test_fit_killed_and_resumed_from_the_command_line(capsys, extracted, tmp_path):
    """`jsnmf fit` checkpoints while it runs; killed (SIGKILL), `--resume` finishes it with the factors
    of an uninterrupted fit, removes the checkpoints and keeps layers already fitted."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    from jsnmf.estimator import SNMF
    from jsnmf.store import ActivationStore

    store = tmp_path / "run" / "store"
    shutil.copytree(extracted / "store", store)
    fitting = tmp_path / "run" / "snmf" / "layer_00.fitting"
    options = ["--layers", "0", "--rank", "3", "--max-iter", "60", "--tol", "0", "--checkpoint-every", "1"]
    child = subprocess.Popen([sys.executable, "-m", "jsnmf", "fit", "--quiet", "--store", str(store), *options],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while len([p for p in fitting.glob("*") if p.name.isdigit()]) < 3:
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert not (tmp_path / "run" / "snmf" / "layer_00").exists()  # killed before the end

    code, _, err = run_cli(capsys, "fit", "--store", store, *options)
    assert_user_error(code, err, "interrupted fit", "--resume")
    code, out, err = run_cli(capsys, "fit", "--store", store, *options, "--resume")
    assert code == 0, err
    assert "(resuming)" in out and not fitting.exists()
    resumed = SNMF.load(tmp_path / "run" / "snmf" / "layer_00")
    X = ActivationStore.open(store).layer_array(0)
    uninterrupted = SNMF(3, max_iter=60, tol=0.0).fit(X)
    assert resumed.n_iter_ == uninterrupted.n_iter_ == 60
    np.testing.assert_array_equal(resumed.features_, uninterrupted.features_)
    np.testing.assert_array_equal(resumed.codes_, uninterrupted.codes_)

    code, out, err = run_cli(capsys, "fit", "--store", store, *options, "--resume")
    assert code == 0 and "already fitted" in out, err


def test_bos_switch_on_a_gpt2_model(capsys, extracted, model_dir, small_corpus, tmp_path):
    # default (the paper's): BOS prepended to every document, then dropped from X with the padding
    from jsnmf.store import ActivationStore

    default = ActivationStore.open(extracted / "store")
    bos = default.manifest["bos"]
    assert bos["policy"] == "prepend" and bos["prepended"] and bos["dropped_from_x"] and bos["padding_dropped_from_x"]
    assert default.positions.min() == 1 and bos["token_id"] not in default.token_ids
    # --keep-bos now keeps it, also on GPT-2 whose tokenizer adds none (it silently did nothing before)
    code, _, err = run_cli(capsys, "extract", "--model", model_dir, "--corpus", small_corpus, "--layers", "0",
                           "--out", tmp_path / "kept", "--keep-bos")
    assert code == 0, err
    kept = ActivationStore.open(tmp_path / "kept" / "store")
    assert kept.n_tokens == default.n_tokens + 60 and not kept.manifest["bos"]["dropped_from_x"]
    assert (kept.token_ids[kept.positions == 0] == bos["token_id"]).all()
    code, _, err = run_cli(capsys, "extract", "--model", model_dir, "--corpus", small_corpus, "--layers", "0",
                           "--out", tmp_path / "none", "--no-bos")
    assert code == 0, err
    none = ActivationStore.open(tmp_path / "none" / "store")
    assert none.manifest["bos"]["policy"] == "none" and not none.manifest["bos"]["present"]
    assert none.n_tokens == default.n_tokens and bos["token_id"] not in none.token_ids
    assert not np.array_equal(none.layer_array(0), default.layer_array(0))  # BOS changes what the model reads
    code, _, err = run_cli(capsys, "extract", "--model", model_dir, "--corpus", small_corpus, "--layers", "0",
                           "--out", tmp_path / "both", "--no-bos", "--keep-bos")
    assert_user_error(code, err, "--keep-bos", "--no-bos")

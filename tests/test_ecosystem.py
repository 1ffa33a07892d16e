"""What a user of SAELens/TransformerLens/Hugging Face expects of the command line and the artifacts:
--version, help with examples, early checks, --overwrite and reuse, movable run folders, portable
exports, hook sites through the store, no PyTorch advice, honest dependencies."""
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from jsnmf import SNMF, __version__, demo
from jsnmf.cli import main
from jsnmf.estimator import FewNeuronsWarning

from test_cli import assert_user_error, run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return demo.build_demo_model(tmp_path_factory.mktemp("eco") / "model")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("eco-corpus") / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in demo.read_demo_corpus()[:40]))
    return path


def test_version_and_help_with_examples(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"jsnmf {__version__}"
    for command in ("extract", "fit", "report", "run", "export", "evaluate", "steer"):
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "examples:\n  jsnmf " + command in text, command
    assert main(["fit", "--help"]) == 0
    text = capsys.readouterr().out
    assert "(--rank K | --preset NAME)" in text and "required unless --preset" in text
    assert "none" in text and "ceil(p·width)" in text  # --sparsity none, and what p means


def test_sparsity_none_and_few_neurons_warning(capsys, tmp_path):
    from jsnmf.cli.steps import fit_settings
    from jsnmf.cli import build_parser

    args = build_parser().parse_args(["fit", "--store", "S", "--rank", "2", "--sparsity", "none"])
    assert fit_settings(args)["sparsity"] is None
    X = np.abs(np.random.default_rng(0).normal(size=(40, 64))).astype(np.float32)
    with pytest.warns(FewNeuronsWarning, match=r"keeps ceil\(0.01·64\) = 1 of 64"):
        SNMF(rank=2, max_iter=2).fit(X, progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FewNeuronsWarning)
        SNMF(rank=2, max_iter=2, sparsity=0.1).fit(X, progress=False)  # 7 of 64: no warning
        SNMF(rank=2, max_iter=2, sparsity=None).fit(X, progress=False)


def test_rank_checked_before_the_forward_pass(capsys, model_dir, corpus, tmp_path):
    code, _, err = run_cli(capsys, "run", "--model", model_dir, "--corpus", corpus, "--layers", "0", "--rank", "300",
                       "--out", tmp_path / "a")
    assert_user_error(code, err, "rank 300 exceeds the width of hook_post", "= 256")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("the red fox\n")
    code, _, err = run_cli(capsys, "run", "--model", model_dir, "--corpus", tiny, "--layers", "0,1", "--rank", "100",
                       "--out", tmp_path / "b")
    assert_user_error(code, err, "rank 100 exceeds min(n_tokens, width)", "tokens")
    assert not (tmp_path / "b" / "store").exists()  # refused before anything was written


def test_report_on_a_missing_run_says_nothing_first(capsys, tmp_path):
    code, out, err = run_cli(capsys, "report", "--run", tmp_path / "nope")
    assert_user_error(code, err, "run directory not found")
    assert "writing the report" not in out


def test_overwrite_reuse_move_export(capsys, model_dir, corpus, tmp_path):
    run = tmp_path / "run"
    common = ["--model", model_dir, "--layers", "1", "--rank", "4", "--max-iter", "5", "--sparsity", "0.03",
              "--no-vocab", "--out", run]
    assert run_cli(capsys, "run", "--corpus", corpus, *common)[0] == 0
    code, out, _ = run_cli(capsys, "run", "--corpus", corpus, *common)
    assert code == 0 and "reused the store" in out
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in demo.read_demo_corpus()[40:80]))
    code, _, err = run_cli(capsys, "run", "--corpus", other, *common)
    assert_user_error(code, err, "refusing to resume", "--overwrite")
    code, out, _ = run_cli(capsys, "run", "--corpus", other, "--overwrite", *common)
    assert code == 0 and "--overwrite" in out and "reused" not in out
    manifest = json.loads((run / "store" / "manifest.json").read_text())
    assert manifest["corpus"]["sha256"] != "" and manifest["hook_site"] == "hook_post"
    saved = json.loads((run / "snmf" / "layer_01" / "manifest.json").read_text())
    assert saved["source"] == {"model": str(model_dir.resolve()), "layer": 1, "hook": "blocks.1.mlp.hook_post"}

    # moved run folder, model elsewhere: --model points at it
    moved_model = tmp_path / "models" / "demo"
    shutil.copytree(model_dir, moved_model)
    moved = tmp_path / "moved"
    shutil.move(run, moved)
    code, out, err = run_cli(capsys, "report", "--run", moved, "--model", moved_model)
    assert code == 0, err
    code, out, err = run_cli(capsys, "export", "--run", moved, "--codes")
    assert code == 0, err
    export = moved / "export" / "layer_01"
    cfg = json.loads((export / "cfg.json").read_text())
    assert cfg["model_name"] == str(model_dir.resolve()) and cfg["layer"] == 1
    assert cfg["hook_name"] == "blocks.1.mlp.hook_post" and cfg["rank"] == 4 and cfg["sparsity"] == 0.03
    assert cfg["solver"] == "mu" and cfg["dtype"] == "float32" and cfg["jsnmf_version"] == __version__
    fitted = SNMF.load(moved / "snmf" / "layer_01")
    assert cfg["n_tokens"] == fitted.codes_.shape[0]
    from safetensors.numpy import load_file

    tensors = load_file(export / "features.safetensors")
    np.testing.assert_array_equal(tensors["F"], fitted.features_)
    np.testing.assert_array_equal(tensors["G"], fitted.codes_)
    back = SNMF.load(export)
    np.testing.assert_array_equal(back.features_, fitted.features_)
    assert back.get_params() == fitted.get_params() and back.source_["layer"] == 1
    np.testing.assert_allclose(back.transform(np.asarray(fitted.codes_ @ fitted.features_.T)[:5]),
                               fitted.transform(np.asarray(fitted.codes_ @ fitted.features_.T)[:5]), rtol=1e-5)


def test_a_run_folder_with_its_model_inside_moves(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--out", tmp_path / "demo", "--layers", "1", "--max-iter", "5", "--no-vocab")
    assert code == 0, err
    manifest = json.loads((tmp_path / "demo" / "store" / "manifest.json").read_text())
    assert manifest["model"]["path"] == "demo-model" and manifest["tokenizer"]["path"] == "demo-model"
    shutil.move(tmp_path / "demo", tmp_path / "elsewhere")
    code, _, err = run_cli(capsys, "report", "--run", tmp_path / "elsewhere")  # vocab projections too
    assert code == 0, err


def test_export_refuses_damage(tmp_path):
    X = np.abs(np.random.default_rng(1).normal(size=(30, 16))).astype(np.float32)
    model = SNMF(rank=2, max_iter=3, sparsity=0.5).fit(X, progress=False)
    path = model.export(tmp_path / "e")
    back = SNMF.load(path)
    assert back.codes_.shape == (0, 2) and back.source_ == {"model": None, "layer": None, "hook": None}
    with pytest.raises(ValueError, match="holds no codes"):
        back.export(tmp_path / "again", codes=True)
    data = bytearray((path / "features.safetensors").read_bytes())
    data[-1] ^= 1
    (path / "features.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        SNMF.load(path)


def test_extract_at_hook_mlp_out(capsys, model_dir, corpus, tmp_path):
    import jsnmf.models as jm
    from jsnmf.store import ActivationStore

    code, _, err = run_cli(capsys, "extract", "--model", model_dir, "--corpus", corpus, "--layers", "0,1",
                       "--hook", "hook_mlp_out", "--out", tmp_path / "r")
    assert code == 0, err
    store = ActivationStore.open(tmp_path / "r" / "store")
    assert store.hook_site == "hook_mlp_out" and store.hook_names == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    lm, tok = jm.load(model_dir)
    assert store.d_mlp == lm.config.d_model
    first = store.documents[0] if isinstance(store.documents[0], str) else store.documents[0]["text"]
    ids = [tok.bos_token_id] + tok(first, add_special_tokens=False)["input_ids"]
    out = lm(np.asarray([ids]), capture=["blocks.1.hook_mlp_out"])
    expected = np.asarray(out.hook("blocks.1.hook_mlp_out"))[0, 1:]  # the BOS row is dropped from X
    np.testing.assert_allclose(store.read(1, 0, len(ids) - 1), expected, atol=1e-5)
    code, _, err = run_cli(capsys, "fit", "--store", tmp_path / "r" / "store", "--rank", "3", "--max-iter", "3",
                       "--sparsity", "none")
    assert code == 0, err
    assert SNMF.load(tmp_path / "r" / "snmf" / "layer_01").source_["hook"] == "blocks.1.hook_mlp_out"
    code, _, err = run_cli(capsys, "report", "--run", tmp_path / "r", "--top-k", "3")  # vocab at the residual site
    assert code == 0, err
    code, _, err = run_cli(capsys, "steer", "--run", tmp_path / "r", "--layer", "1", "--feature", "0", "--alpha", "1")
    assert_user_error(code, err, "hook_mlp_out", "hook_post")


def test_no_pytorch_advice_when_torch_is_missing(model_dir):
    code = ("import importlib.util as u; real = u.find_spec\n"
            "u.find_spec = lambda n, *a, **k: None if n.split('.')[0] == 'torch' else real(n, *a, **k)\n"
            f"from jsnmf.models import load_tokenizer; load_tokenizer({str(model_dir)!r})\n"
            "import transformers; assert transformers.is_torch_available() is False\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "PyTorch was not found" not in done.stderr


def test_missing_model_hint_names_hf_download(tmp_path, monkeypatch):
    from jsnmf.models.loading import resolve_checkpoint_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="`hf download nobody/none`"):
        resolve_checkpoint_dir("nobody/none")


def _imported_distributions() -> set[str]:
    """Top-level third-party modules imported by the package's code (jsnmf/, kernels/, models/)."""
    names = set()
    for folder in ("jsnmf", "kernels", "models"):
        for path in (ROOT / folder).rglob("*.py"):
            for match in re.finditer(r"^\s*(?:from|import)\s+([A-Za-z_][\w]*)", path.read_text(), re.M):
                names.add(match[1])
    local = {"jsnmf", "kernels", "models", "__future__"}
    return {n for n in names - local if n not in sys.stdlib_module_names}


def test_declared_dependencies_match_imports():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower().replace("-", "_") for d in project["dependencies"]}
    module_of = {"orbax_checkpoint": "orbax", "scikit_learn": "sklearn"}
    declared_modules = {module_of.get(d, d) for d in declared}
    optional = {"torch", "sklearn", "overcomplete", "pytest"}  # test/bench extras, imported only where guarded
    imported = _imported_distributions()
    assert imported - declared_modules - optional == set(), "imported but not declared"
    assert declared_modules - imported == set(), "declared but never imported"
    test_extra = " ".join(project["optional-dependencies"]["test"])
    assert "torch" in test_extra and "torch==" not in test_extra  # a floor, installable from a local wheel

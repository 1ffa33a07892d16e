"""The paper's fit settings as a named preset: what it holds, how SNMF and the CLI take it."""
import numpy as np
import pytest

from jsnmf import SNMF
from jsnmf.cli import build_parser, fit_settings
from jsnmf.presets import HYPERPARAMETERS, PAPER, PRESETS, get_preset


def test_paper_preset_holds_the_papers_hyperparameters_only():
    assert get_preset("paper") is PAPER and PRESETS["paper"] is PAPER
    assert dict(PAPER.settings) == {"rank": 100, "solver": "mu", "sparsity": 0.01, "init": "random",
                                    "max_iter": 2000, "tol": 0.0, "patience": 1500, "ridge": 1e-6}
    assert set(PAPER.settings) <= set(HYPERPARAMETERS)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_preset("nope")
    with pytest.raises(ValueError, match="not hyperparameters"):
        PAPER.params(progress=False)  # runtime settings never live in a preset
    with pytest.raises(ValueError, match="not hyperparameters"):
        SNMF.from_preset("paper", rank=3, chunk_tokens=64)


def test_from_preset_and_differences():
    model = SNMF.from_preset("paper", rank=3, max_iter=4)
    params = model.get_params()
    assert params["rank"] == 3 and params["max_iter"] == 4 and params["patience"] == 1500
    assert params["init"] == "random" and params["sparsity"] == 0.01 and params["tol"] == 0.0
    assert PAPER.differences(params) == {"max_iter": {"preset": 2000, "actual": 4}}
    X = np.abs(np.random.default_rng(0).standard_normal((40, 12))).astype(np.float32)
    assert model.fit(X).n_iter_ == 4
    default = SNMF(rank=3).get_params()
    assert set(PAPER.differences(default)) == {"max_iter", "patience", "tol"}


def test_cli_preset_is_overridden_by_explicit_options():
    args = build_parser().parse_args(["fit", "--store", "S", "--preset", "paper", "--max-iter", "7"])
    settings = fit_settings(args)
    assert settings["max_iter"] == 7 and settings["patience"] == 1500 and settings["tol"] == 0.0
    assert "rank" not in settings

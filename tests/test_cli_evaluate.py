"""``jsnmf evaluate`` and ``jsnmf steer`` on the demo run: the planted concepts are detected (AUROC ≥ 0.9),
steering along a planted feature writes its concept's words, bad input is one ``jsnmf: error:`` line."""
import json
import re

import pytest

from jsnmf import demo
from jsnmf.cli import main

from test_cli import assert_user_error, run_cli

PLANTED = sorted(demo.CONCEPTS)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    assert main(["--quiet", "run", "--out", str(run), "--no-vocab"]) == 0
    return run


@pytest.fixture(scope="module")
def evaluated(demo_run):
    code = main(["--quiet", "evaluate", "--run", str(demo_run), "--corpus", str(demo.demo_corpus_path()),
                 "--layers", "1", "--kl-targets", "0.05", "2.0", "--n-samples", "2", "--max-new-tokens", "8",
                 "--steer-concepts", "3", "--hierarchy", "12,4"])
    assert code == 0
    return json.loads((demo_run / "evaluation.json").read_text())


def test_evaluate_detects_the_planted_concepts_and_steers_to_them(evaluated):
    data = evaluated
    assert data["format"] == "jsnmf.evaluation" and set(PLANTED) <= set(data["concepts"])
    assert data["judge"]["validation"]["auroc"] == 1.0  # the lexicon judge separates matched from mismatched
    layer = data["layers"]["1"]
    for method in ("SNMF", "DiffMeans"):
        per_concept = layer["detection"][method]["per_concept"]
        for concept in PLANTED:
            assert per_concept[concept]["auroc"] >= 0.9, (method, concept, per_concept[concept])
    snmf = layer["steering"]["SNMF"]
    assert sorted(snmf) == PLANTED[:3] == data["steered_concepts"]
    for concept, cell in snmf.items():
        low, high = cell["targets"]
        assert low["target"] == 0.05 and high["target"] == 2.0 and low["reached"] and high["reached"]
        assert abs(high["kl"] - 2.0) <= 0.02 * 2.0 and high["alpha"] > low["alpha"] > 0
        words = " ".join(high["samples"]).split()
        assert sum(w in demo.CONCEPTS[concept] for w in words) >= 0.8 * len(words), (concept, high["samples"])
        assert high["score"] >= 0.8 and high["score"] > low["score"]
    tree = layer["hierarchy"]
    assert tree["ranks"] == [12, 4] and len(tree["levels"][1]["nodes"]) == 4
    assert all(node["parent"] and node["top_tokens"] for node in tree["levels"][0]["nodes"])
    fits = data["fits"]["1"]
    assert fits["params"]["init"] == demo.DEMO_INIT and "init" in fits["differs_from_paper_preset"]


def test_evaluate_prints_a_table(demo_run, evaluated, capsys):
    code, out, err = run_cli(capsys, "evaluate", "--run", demo_run, "--corpus", demo.demo_corpus_path(),
                             "--layers", "1", "--kl-targets", "0.5", "--n-samples", "1", "--max-new-tokens", "4",
                             "--steer-concepts", "1")
    assert code == 0, err
    assert "AUROC 1.000" in out and "layer 1" in out and "KL 0.5" in out
    det = json.loads((demo_run / "evaluation.json").read_text())["layers"]["1"]["detection"]
    assert f"{det['SNMF']['mean_auroc']:.3f}" in out and f"{det['DiffMeans']['mean_auroc']:.3f}" in out


def test_steer_prints_continuations_of_the_planted_concept(demo_run, evaluated, capsys):
    j = evaluated["layers"]["1"]["steering"]["SNMF"]["animals"]["feature"]
    code, out, err = run_cli(capsys, "steer", "--run", demo_run, "--layer", "1", "--feature", j, "--kl", "2.0",
                             "--n-samples", "3", "--max-new-tokens", "6")
    assert code == 0, err
    reached = re.search(r"alpha ([\d.]+) gives KL ([\d.]+) \(target 2\)", out)
    assert reached and float(reached[1]) > 0 and abs(float(reached[2]) - 2.0) <= 0.04, out
    samples = [line.split("] ", 1)[1] for line in out.splitlines() if line.startswith("[")]
    assert len(samples) == 3
    words = " ".join(samples).split()
    assert len(words) >= 3 * 5 and sum(w in demo.CONCEPTS["animals"] for w in words) >= 0.8 * len(words), samples


def test_steer_against_a_feature_moves_away_from_its_concept(demo_run, evaluated, capsys):
    """``--negative`` searches α along −v: the KL target is met there too, and the text avoids the concept."""
    j = evaluated["layers"]["1"]["steering"]["SNMF"]["animals"]["feature"]
    code, out, err = run_cli(capsys, "steer", "--run", demo_run, "--layer", "1", "--feature", j, "--kl", "2.0",
                             "--negative", "--n-samples", "3", "--max-new-tokens", "6")
    assert code == 0, err
    reached = re.search(r"\(against it: −v\) at hook_post: alpha ([\d.]+) gives KL ([\d.]+) \(target 2", out)
    assert reached and float(reached[1]) > 0, out
    samples = [line.split("] ", 1)[1] for line in out.splitlines() if line.startswith("[")]
    words = " ".join(samples).split()
    assert len(samples) == 3 and sum(w in demo.CONCEPTS["animals"] for w in words) <= 0.2 * len(words), samples


def test_bad_input_is_one_error_line(demo_run, tmp_path, capsys):
    corpus = demo.demo_corpus_path()
    code, _, err = run_cli(capsys, "steer", "--run", demo_run, "--layer", "1", "--feature", "99", "--kl", "0.1")
    assert_user_error(code, err, "--feature 99 does not exist", "16 features")
    code, _, err = run_cli(capsys, "steer", "--run", demo_run, "--layer", "5", "--feature", "0", "--kl", "0.1")
    assert_user_error(code, err, "no checkpoint for layer 5")
    code, _, err = run_cli(capsys, "steer", "--run", demo_run, "--layer", "1", "--feature", "0", "--kl", "0.1",
                           "--alpha", "3")
    assert_user_error(code, err, "--alpha")
    code, _, err = run_cli(capsys, "evaluate", "--run", demo_run, "--corpus", tmp_path / "nope.json")
    assert_user_error(code, err, "corpus file not found")
    code, _, err = run_cli(capsys, "evaluate", "--run", tmp_path / "norun", "--corpus", corpus)
    assert_user_error(code, err, "run directory not found")
    code, _, err = run_cli(capsys, "evaluate", "--run", demo_run, "--corpus", corpus, "--kl-targets", "0")
    assert_user_error(code, err, "--kl-targets", "> 0")
    unlabelled = tmp_path / "plain.txt"
    unlabelled.write_text("one sentence\nanother sentence\n")
    code, _, err = run_cli(capsys, "evaluate", "--run", demo_run, "--corpus", unlabelled)
    assert_user_error(code, err, "at least two concepts")
    code, _, err = run_cli(capsys, "evaluate", "--run", demo_run, "--corpus", corpus, "--layers", "1",
                           "--judge", demo_run / "demo-model")
    assert_user_error(code, err, "self-judging")


def test_report_shows_the_evaluation(demo_run, evaluated, capsys):
    (demo_run / "evaluation.json").write_text(json.dumps(evaluated))  # the fixture's (with its concept tree)
    data = evaluated
    code, _, err = run_cli(capsys, "report", "--run", demo_run, "--layers", "1", "--no-vocab")
    assert code == 0, err
    page = (demo_run / "report" / "layer_01" / "report.html").read_text()
    layer = data["layers"]["1"]
    assert "Concept detection (max-token cosine)" in page and "Steering at matched KL" in page
    assert "Concept tree" in page and all(n["id"] in page for n in layer["hierarchy"]["levels"][1]["nodes"])
    assert f"matched-vs-mismatched AUROC {data['judge']['validation']['auroc']:.3f}" in page
    for method in ("SNMF", "DiffMeans"):
        assert f"<b>{layer['detection'][method]['mean_auroc']:.3f}</b>" in page
        for entry in layer["detection"][method]["per_concept"].values():
            assert f"{entry['auroc']:.3f}" in page
    for concept, cell in layer["steering"]["SNMF"].items():
        for t in cell["targets"]:
            assert f"{t['alpha']:.3g}" in page and f"{t['score']:.2f}" in page
    records = json.loads((demo_run / "report" / "layer_01" / "features.json").read_text())["features"]
    for concept, cell in layer["steering"]["SNMF"].items():
        assert concept in [s["concept"] for s in records[cell["feature"]]["steering"]]


@pytest.mark.real
def test_evaluate_with_a_real_judge_and_the_sae_baseline(demo_run, tmp_path):
    """The paths the demo's lexicon judge does not take: ``--judge`` (a likelihood-ratio judge under
    SmolLM2-135M, fetched as the real-model tests fetch it) and ``--sae`` (a TopK SAE trained on the
    corpus): their validation and figures are in the JSON, the SAE is scored on the same concepts."""
    from jsnmf.models import fetch

    if fetch.cached_path("smollm2-135m") is None:
        pytest.skip("smollm2-135m is not cached: run `python -m jsnmf.models.fetch smollm2-135m`")
    code = main(["--quiet", "evaluate", "--run", str(demo_run), "--corpus", str(demo.demo_corpus_path()),
                 "--layers", "1", "--kl-targets", "1.0", "--n-samples", "1", "--max-new-tokens", "6",
                 "--steer-concepts", "2", "--judge", "smollm2-135m", "--sae"])
    assert code == 0
    data = json.loads((demo_run / "evaluation.json").read_text())
    judge = data["judge"]
    assert "likelihood ratio" in judge["name"] and "SmolLM2" in judge["name"]
    assert 0.0 <= judge["validation"]["auroc"] <= 1.0 and judge["validation"]["n_sentences"] > 0
    layer = data["layers"]["1"]
    sae = layer["sae"]
    assert sae["width"] == 4 * layer["rank"] and 0.0 <= sae["dead_fraction"] <= 1.0 and 0.0 <= sae["fvu"] < 1.0
    sae_detection = layer["detection"]["TopK SAE"]
    assert sae_detection["site"] == "hook_mlp_out" and sae_detection["matched"] >= 1
    for cell in layer["steering"]["SNMF"].values():
        (target,) = cell["targets"]
        assert target["target"] == 1.0 and target["samples"] and "score" in target

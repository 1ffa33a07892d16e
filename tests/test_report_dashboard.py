"""The feature dashboard's numbers, checked against NumPy: unit-norm codes, the activity rule (density,
L0, dead), per-feature histograms, shaded windows, quantile samples, near-duplicate collapsing, signed
vocabulary bars, closest features across layers, the relative-error curve, the index's facts."""

import html
import json
import re

import numpy as np
import pytest

from jsnmf import __version__, report
from jsnmf.report import activity as act_mod
from jsnmf.report.images import relative_error_history
from jsnmf.report.related import active_code_matrix, closest_features

WORDS = [f"w{i}" for i in range(40)]


def decode(ids):
    return " ".join(WORDS[i] for i in ids)


def mu_like(rng, n, k):
    """Codes as multiplicative updates leave them: a few large values, everything else small but > 0."""
    codes = rng.uniform(1e-4, 1e-2, (n, k))
    for j in range(k):
        hot = rng.choice(n, size=n // (3 + j), replace=False)
        codes[hot, j] = rng.uniform(0.2, 1.0, hot.size)
    return codes


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    rng = np.random.default_rng(1)
    n, d, k = 240, 10, 4
    token_ids = rng.integers(0, len(WORDS), n)
    doc_index = np.repeat(np.arange(12), 20)
    positions = np.tile(np.arange(20), 12)
    # documents 10 and 11 repeat document 9: near-duplicate contexts of the same strongest token
    token_ids[200:220] = token_ids[180:200]
    token_ids[220:240] = token_ids[180:200]
    codes = mu_like(rng, n, k)
    codes[[185, 205, 225], 0] = [5.0, 4.9, 4.8]
    codes[:, 3] = 1e-9  # dead: far below the other features' scale
    features = rng.standard_normal((d, k)) * np.array([1.0, 3.0, 0.5, 1.0])
    vocab = [{"top": [("up", 2.0), ("more", 0.5)], "bottom": [("down", -1.0)]},
             {"top": [("a", 0.0), ("b", -1e-9)], "bottom": [("c", -3.0), ("d", -2.0)]},  # top side all ≈ 0
             {"top": [("e", 1.0)], "bottom": [("f", 0.5)]}, {"top": [], "bottom": []}]
    inputs = report.LayerInputs(features=features, codes=codes, token_ids=token_ids, doc_index=doc_index,
                                positions=positions, decode=decode, vocab=vocab,
                                loss_history=np.linspace(50.0, 20.0, 30),
                                fit_info={"n_iter": 30, "relative_error": 0.5, "params": {"rank": k, "solver": "mu"}})
    options = report.ReportOptions(k_top=5, window=4, n_quantiles=3, per_quantile=2, hist_bins=8)
    out = tmp_path_factory.mktemp("dash") / "layer_02"
    written = report.write_layer_report(out, 2, inputs, options)
    data = report.read_features(written.features_json)
    unit = codes * np.linalg.norm(features, axis=0)
    return dict(data=data, html=written.html.read_text(encoding="utf-8"), unit=unit, codes=codes, features=features,
                token_ids=token_ids, written=written, options=options)


def test_codes_are_unit_norm_and_shown_so(layer):
    unit, data = layer["unit"], layer["data"]
    for f in data["features"]:
        j = f["feature"]
        assert f["norm"] == pytest.approx(np.linalg.norm(layer["features"][:, j]))
        assert f["max_code"] == pytest.approx(unit[:, j].max(), rel=1e-6)
        for t in f["top_tokens"]:
            assert t["value"] == pytest.approx(unit[t["token_index"], j], rel=1e-6)
            assert f"{t['value']:.3f}" in layer["html"]
    assert "unit-norm units" in layer["html"] and "G[token, j]·‖F[:, j]‖" in html.unescape(layer["html"])


def test_activity_rule_density_l0_dead(layer):
    unit, data = layer["unit"], layer["data"]
    live = unit.max(axis=0) >= 0.01 * np.median(unit.max(axis=0))
    active = (unit >= 0.1 * unit.max(axis=0)) & live
    assert [f["dead"] for f in data["features"]] == [False, False, False, True]
    for f in data["features"]:
        assert f["density"] == pytest.approx(active[:, f["feature"]].mean())
        assert 0 < f["density"] < 1 or f["dead"]  # never the 100 % that "code > 0" gives mu codes
    assert data["l0"] == pytest.approx(active.sum(axis=1).mean())
    assert data["n_dead"] == 1 and data["activity"]["active_fraction"] == 0.1
    assert html.escape(data["activity"]["rule"]) in layer["html"]
    assert f"L0 {active.sum(axis=1).mean():.2f}" in layer["html"]


def test_histograms_count_the_active_codes(layer):
    unit, data = layer["unit"], layer["data"]
    page = layer["html"]
    for f in data["features"]:
        j = f["feature"]
        if f["dead"]:
            assert f["histogram"] == {"edges": [], "counts": []}
            continue
        threshold = 0.1 * unit[:, j].max()
        counts, edges = np.histogram(unit[:, j][unit[:, j] >= threshold], bins=8, range=(threshold, unit[:, j].max()))
        assert f["histogram"]["counts"] == counts.tolist()
        assert np.allclose(f["histogram"]["edges"], edges, rtol=1e-6)
        section = page[page.index(f'id="feature-{j}"'):]
        svg = section[section.index("<svg class=hist"):section.index("</svg>")]
        assert [int(c) for c in re.findall(r'data-count="(\d+)"', svg)] == counts.tolist()


def test_windows_shade_every_active_token(layer):
    unit, data = layer["unit"], layer["data"]
    for f in data["features"][:3]:
        j, threshold = f["feature"], f["threshold"]
        for t in f["top_tokens"] + [e for s in f["samples"] for e in s["examples"]]:
            w = t["window"]
            i = t["token_index"]
            assert "".join(w["tokens"]) == t["context"]["left"] + t["context"]["token"] + t["context"]["right"]
            rows = i - w["at"] + np.arange(len(w["tokens"]))  # documents are contiguous rows here
            assert np.allclose(w["values"], unit[rows, j], rtol=1e-4)
            assert w["values"][w["at"]] == pytest.approx(t["value"], rel=1e-4)
            shown = sum(v >= threshold for v in w["values"])
            assert shown >= 1
    # one shaded span per active token of the first example
    first = data["features"][0]["top_tokens"][0]
    page = layer["html"]
    row = page[page.index('id="feature-0"'):]
    row = row[row.index("<td class=text>"):row.index("</td>", row.index("<td class=text>"))]
    assert row.count("style=\"background:rgba") == sum(v >= data["features"][0]["threshold"] for v in first["window"]["values"])


def test_quantile_samples_and_near_duplicates(layer):
    unit, data = layer["unit"], layer["data"]
    f0 = data["features"][0]
    top = f0["top_tokens"]
    # documents 9, 10, 11 are the same text: the three strongest tokens collapse into one example ×3
    assert top[0]["token_index"] == 185 and top[0]["duplicates"] == 2
    assert {205, 225}.isdisjoint(t["token_index"] for t in top)
    assert "×3" in layer["html"]
    for f in data["features"][:3]:
        j = f["feature"]
        top_ids = {t["token_index"] for t in f["top_tokens"]}
        active = np.sort(unit[:, j][unit[:, j] >= f["threshold"]])
        assert len(f["samples"]) == 3
        for s in f["samples"]:
            lo, hi = s["range"]
            assert lo == pytest.approx(np.quantile(active, s["quantiles"][0]), rel=1e-5)
            assert hi == pytest.approx(np.quantile(active, s["quantiles"][1]), rel=1e-5)
            assert 1 <= len(s["examples"]) <= 2
            for e in s["examples"]:
                assert lo - 1e-5 <= e["value"] <= hi + 1e-5 and e["token_index"] not in top_ids
        assert [s["quantiles"][0] for s in f["samples"]] == sorted((s["quantiles"][0] for s in f["samples"]), reverse=True)


def test_vocab_signed_bars_hide_a_zero_side(layer):
    page, data = layer["html"], layer["data"]
    f0 = page[page.index('id="feature-0"'):page.index('id="feature-1"')]
    assert "promoted" in f0 and "suppressed" in f0 and "+2" in f0 and "-1" in f0
    f1 = page[page.index('id="feature-1"'):page.index('id="feature-2"')]
    assert "promoted" not in f1 and "suppressed" in f1 and "-3" in f1
    f2 = page[page.index('id="feature-2"'):page.index('id="feature-3"')]
    assert "suppressed" not in f2  # its "bottom" logit is positive: no negative side to show
    assert data["features"][1]["vocab_top"][0] == {"token": "a", "logit": 0.0}  # the data keeps everything


def test_closest_features_across_layers():
    rng = np.random.default_rng(2)
    codes_a = mu_like(rng, 300, 5)
    perm = np.array([3, 0, 4, 1, 2])
    codes_b = codes_a[:, perm] * 2.0  # layer b's feature m is layer a's feature perm[m]
    matrices = {}
    for layer, codes in ((0, codes_a), (5, codes_b)):
        a = act_mod.activity(codes, 0.1, 0.01)
        matrices[layer] = active_code_matrix(codes, a)
    related = closest_features(matrices, n_related=2)
    for m in range(5):
        assert related[5][m][0] == {"layer": 0, "feature": int(perm[m]), "cosine": pytest.approx(1.0, abs=1e-4)}
        assert related[0][perm[m]][0]["feature"] == m
        assert all(r["layer"] != 5 for r in related[5][m])


def test_related_panel_links(tmp_path):
    rng = np.random.default_rng(3)
    n = 40
    inputs = report.LayerInputs(
        features=rng.standard_normal((6, 2)), codes=mu_like(rng, n, 2), token_ids=rng.integers(0, 40, n),
        doc_index=np.repeat(np.arange(4), 10), positions=np.tile(np.arange(10), 4), decode=decode,
        related=[[{"layer": 7, "feature": 1, "cosine": 0.93}], []])
    written = report.write_layer_report(tmp_path / "layer_01", 1, inputs)
    page = written.html.read_text()
    assert '<a href="../layer_07/report.html#feature-1">layer 7 · feature 1</a>' in page and "0.93" in page
    assert report.read_features(written.features_json)["features"][0]["related"][0]["cosine"] == 0.93


def test_relative_error_curve():
    history = np.array([400.0, 100.0, 25.0])
    assert relative_error_history(history, 100.0).tolist() == [2.0, 1.0, 0.5]
    assert relative_error_history(history, None) is None


def test_index_shows_parameters_version_recovery_and_all_features(layer, tmp_path):
    layer_report = layer["written"]
    layer_report.recovery = {"recovered": 3, "total": 4, "concepts": {
        "colours": {"recovered": True}, "animals": {"recovered": True}, "food": {"recovered": True},
        "weather": {"recovered": False}}}
    index = report.write_index(layer_report.html.parent.parent, [layer_report])
    page = index.read_text()
    assert f"<td>{__version__}</td>" in page
    assert "<b>3/4</b> planted concepts" in page and "weather" in page
    assert "<td>solver</td><td>mu</td>" in page
    assert page.count('<a href="layer_02/report.html#feature-') == 4
    densities = re.findall(r'data-density="([0-9.e-]+)"', page)
    assert [float(d) for d in densities] == pytest.approx([f["density"] for f in layer["data"]["features"]], rel=1e-5)
    assert "jsnmf " + __version__ in layer["html"]
    assert json.loads(layer_report.features_json.read_text())["jsnmf_version"] == __version__

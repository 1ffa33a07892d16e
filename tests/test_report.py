"""jsnmf.report on small synthetic factors: the HTML parses and names every feature, token text is
escaped, features.json round-trips, the PNGs are real PNGs."""

import base64
import json
from html.parser import HTMLParser

import numpy as np
import pytest

from jsnmf import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "img", "br", "link", "input", "hr", "source", "wbr"}
VOCAB = ["the", "cat", "<script>alert(1)</script>", "sat", "&amp;", "dog", "ran", "\"quoted\""]


def decode(ids):
    return " ".join(VOCAB[i] for i in ids)


class TagCollector(HTMLParser):
    """Collects start tags with their attributes and all text; fails on unbalanced structure."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.text, self.stack = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        # HTML allows leaving out some end tags; everything we write closes its elements explicitly.
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}>, open: {self.stack[-3:]}"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(path):
    collector = TagCollector()
    collector.feed(path.read_text(encoding="utf-8"))
    collector.close()
    assert collector.stack == [], f"unclosed tags {collector.stack}"
    return collector


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(0)
    n, d, k = 60, 12, 3
    token_ids = rng.integers(0, len(VOCAB), n)
    doc_index = np.repeat(np.arange(6), 10)
    positions = np.tile(np.arange(10), 6)
    label_index = np.repeat(np.array([0, 1, -1, 0, 1, 0]), 10)
    codes = np.maximum(rng.standard_normal((n, k)), 0)
    codes[:, 2] = 0.0  # a dead feature
    features = rng.standard_normal((d, k))
    features[:, 2] = 0.0
    vocab = [{"top": [("cat", 2.0), ("<b>", 1.0)], "bottom": [("dog", -1.5)]} for _ in range(k)]
    return dict(features=features, codes=codes, token_ids=token_ids, doc_index=doc_index,
                positions=positions, label_index=label_index, labels=["animals", "colours & shapes"],
                vocab=vocab, loss_history=np.geomspace(100.0, 1.0, 40))


@pytest.fixture(scope="module")
def written(tmp_path_factory, synthetic):
    out = tmp_path_factory.mktemp("report") / "layer_03"
    s = synthetic
    inputs = report.LayerInputs(
        features=s["features"], codes=s["codes"], token_ids=s["token_ids"], doc_index=s["doc_index"],
        positions=s["positions"], decode=decode, label_index=s["label_index"], labels=s["labels"], vocab=s["vocab"],
        loss_history=s["loss_history"], fit_info={"n_iter": 40, "relative_error": 0.25, "params": {"rank": 3}})
    layer_report = report.write_layer_report(out, 3, inputs, report.ReportOptions(k_top=5, window=3))
    return out, layer_report


def test_layer_report_files(written):
    out, layer_report = written
    assert sorted(p.name for p in out.iterdir()) == ["codes.png", "features.json", "loss.png", "report.html"]
    assert layer_report.html == out / "report.html" and layer_report.n_dead == 1 and layer_report.rank == 3
    for name in ("loss.png", "codes.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_html_parses_names_every_feature_and_embeds_images(written):
    out, _ = written
    page = parse(out / "report.html")
    text = "".join(page.text)
    ids = {attrs.get("id") for _, attrs in page.tags}
    for j in range(3):
        assert f"Feature {j}" in text
        assert f"feature-{j}" in ids
    images = [attrs["src"] for tag, attrs in page.tags if tag == "img"]
    assert len(images) == 2
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_MAGIC
    # Only inline script, no stylesheet or image fetched from elsewhere: the page is self-contained.
    assert all("src" not in attrs for tag, attrs in page.tags if tag == "script")
    assert not any(str(v).startswith("http") for _, attrs in page.tags for v in attrs.values())
    assert "Vocabulary projection" in text and "Labels of the top tokens" in text and "dead" in text
    assert "colours & shapes" in text


def test_token_text_is_escaped(written):
    out, _ = written
    raw = (out / "report.html").read_text(encoding="utf-8")
    assert "<script>alert" not in raw and "&lt;script&gt;alert" in raw
    assert "<b>" not in raw and "&lt;b&gt;" in raw
    assert "&amp;amp;" in raw  # the literal token "&amp;" shown as text


def test_features_json_round_trip(written, synthetic):
    out, _ = written
    data = report.read_features(out / "features.json")
    assert data == json.loads((out / "features.json").read_text(encoding="utf-8"))
    assert data["layer"] == 3 and data["rank"] == 3 and data["n_tokens"] == 60 and data["d_mlp"] == 12
    assert data["hook_name"] == "blocks.3.mlp.hook_post"
    assert data["fit"]["n_iter"] == 40 and data["fit"]["final_loss"] == pytest.approx(1.0)
    unit = synthetic["codes"] * np.linalg.norm(synthetic["features"], axis=0)
    for feature in data["features"]:
        j = feature["feature"]
        values = [t["value"] for t in feature["top_tokens"]]
        active = unit[:, j][unit[:, j] >= 0.1 * unit[:, j].max()] if not feature["dead"] else []
        assert values == sorted(values, reverse=True)
        assert all(np.isclose(active, v, rtol=1e-6).any() for v in values)
        if not feature["dead"]:
            assert values[0] == pytest.approx(unit[:, j].max(), rel=1e-6)
        assert feature["density"] == pytest.approx(len(active) / len(unit))
        for t in feature["top_tokens"]:
            c = t["context"]
            assert unit[t["token_index"], j] == pytest.approx(t["value"], rel=1e-6)
            assert c["token"] == VOCAB[synthetic["token_ids"][t["token_index"]]].strip()
            # the context lies inside the token's own document
            doc = synthetic["doc_index"] == t["document"]
            assert set((c["left"] + " " + c["right"]).split()) <= {VOCAB[i] for i in synthetic["token_ids"][doc]}
        if not feature["dead"]:
            assert abs(sum(feature["label_shares"].values()) - 1.0) < 1e-9
    assert data["features"][2]["dead"] and data["features"][2]["top_tokens"] == []
    assert data["features"][0]["vocab_top"][0] == {"token": "cat", "logit": 2.0}
    assert data["features"][0]["top_neurons"][0]["neuron"] == int(np.argmax(np.abs(synthetic["features"][:, 0])))


def test_read_features_rejects_other_files(tmp_path):
    path = tmp_path / "features.json"
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a jsnmf.report.features"):
        report.read_features(path)


def test_index_links_layers(tmp_path, written):
    out, layer_report = written
    index = report.write_index(out.parent, [layer_report], {"model": "<tiny>"})
    page = parse(index)
    links = [attrs["href"] for tag, attrs in page.tags if tag == "a"]
    assert links == ["layer_03/report.html"] + [f"layer_03/report.html#feature-{j}" for j in range(3)]
    assert (index.parent / links[0]).is_file()
    assert "&lt;tiny&gt;" in index.read_text()


def test_report_without_labels_or_vocab(tmp_path, synthetic):
    s = synthetic
    r = report.write_layer_report(tmp_path / "l", 0, _inputs(s))
    text = "".join(parse(r.html).text)
    assert "Vocabulary projection" not in text and "Labels of the top tokens" not in text
    data = report.read_features(r.features_json)
    assert data["labels"] == [] and all(f["label_shares"] == {} and f["vocab_top"] == [] for f in data["features"])
    assert (tmp_path / "l" / "loss.png").read_bytes()[:8] == PNG_MAGIC  # drawn even without a history


def test_build_features_checks_shapes(synthetic):
    s = synthetic
    with pytest.raises(ValueError, match="disagree on the rank"):
        report.build_features(_inputs(s, features=s["features"][:, :2]))
    with pytest.raises(ValueError, match="token_ids has 59 rows"):
        report.build_features(_inputs(s, token_ids=s["token_ids"][:-1]))


def _inputs(s, **changes):
    fields = dict(features=s["features"], codes=s["codes"], token_ids=s["token_ids"], doc_index=s["doc_index"],
                  positions=s["positions"], decode=decode)
    return report.LayerInputs(**{**fields, **changes})


def test_evaluation_panels_and_concept_tree(tmp_path, synthetic):
    evaluation = {
        "judge": {"name": "lexicon", "validation": {"auroc": 0.987}},
        "detection": {"SNMF": {"per_concept": {"animals": {"feature": 1, "auroc": 0.912, "gap": 0.25}},
                               "matched": 1, "mean_auroc": 0.912},
                      "DiffMeans": {"per_concept": {"animals": {"feature": 0, "auroc": 0.876, "gap": 0.5}},
                                    "matched": 1, "mean_auroc": 0.876}},
        "steering": {"SNMF": {"animals": {"feature": 1, "site": "hook_post", "targets": [
            {"target": 0.5, "reached": True, "alpha": 12.34, "kl": 0.501, "score": 0.77, "samples": ["dog <cat>"]}]}}},
        "hierarchy": {"ranks": [2, 1], "levels": [
            {"level": 0, "rank": 2, "nodes": [{"id": "L0.0", "top_tokens": ["dog"], "parent": "L1.0"},
                                              {"id": "L0.1", "top_tokens": ["cat"], "parent": "L1.0"}]},
            {"level": 1, "rank": 1, "nodes": [{"id": "L1.0", "top_tokens": ["pets"],
                                               "children": {"L0.0": 0.61, "L0.1": 0.39}}]}]},
    }
    r = report.write_layer_report(tmp_path / "l", 0, _inputs(synthetic, evaluation=evaluation))
    page = r.html.read_text()
    parse(r.html)  # balanced
    for number in ("0.987", "0.912", "0.876", "12.3", "0.501", "0.77", "0.61", "0.39"):
        assert number in page, number
    assert "Concept tree" in page and "L1.0" in page and "dog &lt;cat&gt;" in page
    records = report.read_features(r.features_json)["features"]
    assert records[1]["detection"] == [{"concept": "animals", "auroc": 0.912, "gap": 0.25, "DiffMeans auroc": 0.876}]
    assert records[1]["steering"][0]["targets"][0]["alpha"] == 12.34 and records[0]["steering"] == []

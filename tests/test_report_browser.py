"""The report in a real headless browser (Debian's chromium, DevTools protocol over a pipe): every page
loads without console errors or failed loads and fetches nothing from a network, every link and anchor
resolves, search/filter/sort change the DOM as they should, and a screenshot of each page is saved in
``screenshots/`` (git-ignored; CI keeps it as an artifact).

Without chromium the test fails with the install instruction; it never skips.
"""

from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

from headless import INSTALL_HINT, Browser, find_chromium
from jsnmf import report
from jsnmf.report.related import active_code_matrix, closest_features

SCREENSHOTS = Path(__file__).resolve().parent.parent / "screenshots"
WORDS = ["the", "cat", "dog", "<b>red</b>", "blue", "ran", "sat", "&amp;", "green", "sky", "sun", "rain"]


def decode(ids):
    return " ".join(WORDS[i] for i in ids)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    n, d, k = 200, 16, 5
    token_ids = rng.integers(0, len(WORDS), n)
    doc_index, positions = np.repeat(np.arange(20), 10), np.tile(np.arange(10), 20)
    label_index = np.repeat(rng.integers(-1, 2, 20), 10)
    out = tmp_path_factory.mktemp("browser") / "report"
    layers = {}
    for layer in (0, 3):
        codes = rng.uniform(1e-4, 1e-2, (n, k))
        for j in range(k):
            hot = np.flatnonzero(token_ids == j + 1)  # feature j fires on one word (~8% of tokens)
            codes[hot, j] = rng.uniform(0.3, 1.0, hot.size)
        codes[:, 4] = 0.4 + 0.1 * rng.random(n)  # a dense feature
        layers[layer] = (rng.standard_normal((d, k)), codes)
    options = report.ReportOptions(k_top=6, window=3)
    matrices = {layer: active_code_matrix(*report.prepare(report.LayerInputs(
        features=f, codes=g, token_ids=(), doc_index=(), positions=(), decode=None), options)) for layer, (f, g) in layers.items()}
    related = closest_features(matrices, options.n_related)
    reports = []
    for layer, (features, codes) in layers.items():
        vocab = [{"top": [("sun", 2.0 + j), ("sky", 1.0)], "bottom": [("rain", -1.0 - j)]} for j in range(k)]
        inputs = report.LayerInputs(
            features=features, codes=codes, token_ids=token_ids, doc_index=doc_index, positions=positions,
            decode=decode, label_index=label_index, labels=["weather", "pets"], vocab=vocab,
            loss_history=np.geomspace(10.0, 2.0, 25), related=related[layer],
            fit_info={"n_iter": 25, "relative_error": 0.4, "params": {"rank": k, "solver": "mu", "sparsity": 0.1}})
        reports.append(report.write_layer_report(out / f"layer_{layer:02d}", layer, inputs, options))
    report.write_index(out, reports, {"model": "synthetic"})
    return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if find_chromium() is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    with Browser.launch(tmp_path_factory.mktemp("chromium")) as b:
        yield b


def _check_links(page, path: Path) -> None:
    links = page.evaluate("Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")
    assert links
    for link in links:
        url = urlparse(link)
        assert url.scheme == "file", f"{path.name}: link leaves the report: {link}"
        target = Path(unquote(url.path))
        assert target.is_file(), f"{path.name}: broken link {link}"
        if url.fragment:
            if target == path:
                assert page.evaluate(f"!!document.getElementById({url.fragment!r})"), f"missing anchor {link}"
            else:
                assert f'id="{url.fragment}"' in target.read_text(encoding="utf-8"), f"missing anchor {link}"
    images = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
    assert all(images), f"{path.name}: an image did not load"


def _load(browser, path: Path, name: str):
    page = browser.open(path.as_uri())
    page.drain()
    page.screenshot(SCREENSHOTS / f"{name}.png")
    assert page.errors == [], f"{path.name}: {page.errors}"
    assert all(u.startswith(("file:", "data:")) for u in page.requests), page.requests
    _check_links(page, path)
    return page


VISIBLE_ROWS = "Array.from(document.querySelectorAll('#{t} tbody tr')).filter(r => !r.hidden)"


def _type(page, box: str, selector: str, value) -> None:
    page.evaluate(f"(() => {{ const el = document.querySelector('div.filters[data-table={box}] {selector}'); "
                  f"el.value = {value!r}; el.dispatchEvent(new Event('input', {{bubbles: true}})); }})()")


def test_layer_page_in_chromium(browser, report_dir):
    path = report_dir / "layer_03" / "report.html"
    page = _load(browser, path, "layer_03")
    rows = VISIBLE_ROWS.format(t="features")
    assert page.evaluate(f"{rows}.length") == 5
    # search: feature 0 fires on words 1 and 2 ("cat", "dog"); only it has "dog" among its tokens
    _type(page, "features", "input.q", "dog")
    shown = page.evaluate(f"{rows}.map(r => r.getAttribute('data-target'))")
    assert "feature-1" in shown and "feature-3" not in shown
    hidden = page.evaluate("Array.from(document.querySelectorAll('section.feature')).filter(s => s.hidden).map(s => s.id)")
    assert set(hidden) == {f"feature-{j}" for j in range(5)} - set(shown)  # the sections follow the table
    assert page.evaluate("document.querySelector('div.filters span.count').textContent") == f"{len(shown)} of 5"
    _type(page, "features", "input.q", "")
    # filter: hide dense features (feature 4 is active everywhere)
    page.evaluate("(() => { const c = document.querySelector('input.hide-dense'); c.checked = true; "
                  "c.dispatchEvent(new Event('change')); })()")
    records = report.read_features(path.parent / "features.json")["features"]
    sparse = [f"feature-{f['feature']}" for f in records if f["density"] <= 0.1]
    assert sparse and "feature-4" not in sparse
    assert page.evaluate(f"{rows}.map(r => r.getAttribute('data-target'))") == sparse
    page.evaluate("(() => { const c = document.querySelector('input.hide-dense'); c.checked = false; "
                  "c.dispatchEvent(new Event('change')); })()")
    # sort by density: descending, then ascending; the feature sections follow the order
    page.evaluate("document.querySelector('#features thead th:nth-child(2)').click()")
    densities = page.evaluate(f"{rows}.map(r => parseFloat(r.getAttribute('data-density')))")
    assert densities == sorted(densities, reverse=True) and len(densities) == 5
    order = page.evaluate(f"{rows}.map(r => r.getAttribute('data-target'))")
    assert page.evaluate("Array.from(document.querySelectorAll('#feature-sections > section')).map(s => s.id)") == order
    page.evaluate("document.querySelector('#features thead th:nth-child(2)').click()")
    assert page.evaluate(f"{rows}.map(r => parseFloat(r.getAttribute('data-density')))") == sorted(densities)
    # the page states its units and activity rule, and shades tokens in the contexts
    assert page.evaluate("document.getElementById('units').textContent").count("unit") >= 2
    assert page.evaluate("document.querySelectorAll('span.t[style]').length") > 10
    page.drain()
    assert page.errors == []
    page.screenshot(SCREENSHOTS / "layer_03_sorted.png")


def test_index_page_in_chromium(browser, report_dir):
    page = _load(browser, report_dir / "index.html", "index")
    rows = VISIBLE_ROWS.format(t="all-features")
    assert page.evaluate(f"{rows}.length") == 10
    page.evaluate("(() => { const s = document.querySelector('div.filters[data-table=all-features] select.label'); "
                  "s.value = 'pets'; s.dispatchEvent(new Event('change')); })()")
    labels = page.evaluate(f"{rows}.map(r => r.getAttribute('data-label'))")
    assert labels and set(labels) == {"pets"}
    page.evaluate("(() => { const s = document.querySelector('div.filters[data-table=all-features] select.label'); "
                  "s.value = ''; s.dispatchEvent(new Event('change')); })()")
    _type(page, "all-features", "input.min-density", "50")
    assert [float(d) for d in page.evaluate(f"{rows}.map(r => r.getAttribute('data-density'))")] == [1.0, 1.0]
    assert page.evaluate(f"{rows}.map(r => r.cells[1].textContent)") == ["Feature 4", "Feature 4"]
    page.evaluate("document.querySelector('#layers thead th:nth-child(1)').click()")
    assert page.evaluate("Array.from(document.querySelectorAll('#layers tbody tr')).map(r => r.cells[0].textContent)") \
        == ["Layer 3", "Layer 0"]
    page.drain()
    assert page.errors == []
    _load(browser, report_dir / "layer_00" / "report.html", "layer_00")

"""Search, sort and filter for the report's tables: one inline script (no network, no library).

A ``<table class=sortable>`` sorts by a column when its header is clicked (numbers by the cell's
``data-sort``, else text). A ``<div class=filters data-table=ID>`` holds the controls of table ``ID``:
``input.q`` (text searched in each row's ``data-search``), ``select.label`` (a row's ``data-label``),
``input.hide-dense`` / ``input.hide-dead`` (rows with ``data-dense``/``data-dead`` = 1), ``input.min-density``
(a row's ``data-density`` at least this percentage) and ``span.count`` (rows shown). A row with
``data-target=ID`` shows or hides that element (a feature's section) with it; a table with
``data-reorder=ID`` moves those elements inside element ``ID`` into the table's order when sorted.
"""

from __future__ import annotations

import html
from typing import Sequence

__all__ = ["SCRIPT", "filters_html"]

SCRIPT = r"""
(function () {
  "use strict";
  function key(cell) {
    var raw = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent.trim();
    var num = parseFloat(raw);
    return isNaN(num) || !/^[-+0-9.eE]+$/.test(raw) ? raw.toLowerCase() : num;
  }
  function sortBy(table, col, th) {
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    var desc = th.getAttribute("aria-sort") !== "descending";
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) { c.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", desc ? "descending" : "ascending");
    rows.sort(function (a, b) {
      var x = key(a.cells[col]), y = key(b.cells[col]);
      var r = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1);
      return desc ? -r : r;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    var holder = table.getAttribute("data-reorder") && document.getElementById(table.getAttribute("data-reorder"));
    if (holder) {
      rows.forEach(function (r) {
        var t = r.getAttribute("data-target") && document.getElementById(r.getAttribute("data-target"));
        if (t && t.parentNode === holder) { holder.appendChild(t); }
      });
    }
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.classList.add("sorter");
      th.setAttribute("title", "sort");
      th.addEventListener("click", function () { sortBy(table, col, th); });
    });
  });
  document.querySelectorAll("div.filters").forEach(function (box) {
    var table = document.getElementById(box.getAttribute("data-table"));
    if (!table) { return; }
    function ctl(sel) { return box.querySelector(sel); }
    function apply() {
      var q = ctl("input.q") ? ctl("input.q").value.trim().toLowerCase() : "";
      var label = ctl("select.label") ? ctl("select.label").value : "";
      var hideDense = ctl("input.hide-dense") && ctl("input.hide-dense").checked;
      var hideDead = ctl("input.hide-dead") && ctl("input.hide-dead").checked;
      var minDensity = ctl("input.min-density") ? parseFloat(ctl("input.min-density").value) : NaN;
      var shown = 0;
      Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
        var ok = (!q || (row.getAttribute("data-search") || row.textContent).toLowerCase().indexOf(q) >= 0)
          && (!label || row.getAttribute("data-label") === label)
          && !(hideDense && row.getAttribute("data-dense") === "1")
          && !(hideDead && row.getAttribute("data-dead") === "1")
          && (isNaN(minDensity) || 100 * parseFloat(row.getAttribute("data-density") || "0") >= minDensity);
        row.hidden = !ok;
        if (ok) { shown += 1; }
        var t = row.getAttribute("data-target") && document.getElementById(row.getAttribute("data-target"));
        if (t) { t.hidden = !ok; }
      });
      if (ctl("span.count")) { ctl("span.count").textContent = shown + " of " + table.tBodies[0].rows.length; }
    }
    box.querySelectorAll("input,select").forEach(function (el) {
      el.addEventListener("input", apply);
      el.addEventListener("change", apply);
    });
    apply();
  });
})();
"""


def filters_html(table_id: str, labels: Sequence[str] = (), what: str = "features") -> str:
    """The controls of table ``table_id``: search box, label filter (when there are labels), density
    floor, hide dense / dead, and the count of rows shown."""
    esc = lambda v: html.escape(str(v), quote=True)  # noqa: E731
    label_select = ""
    if labels:
        options = "".join(f"<option value=\"{esc(label)}\">{esc(label)}</option>" for label in labels)
        label_select = (f"<label>top label <select class=label><option value=\"\">any</option>{options}"
                        "</select></label>")
    return (f"<div class=filters data-table=\"{esc(table_id)}\">"
            f"<label>search <input class=q type=search placeholder=\"token, label, vocab…\"></label>{label_select}"
            "<label>density ≥ <input class=min-density type=number min=0 max=100 step=any size=5>%</label>"
            "<label><input class=hide-dense type=checkbox> hide dense</label>"
            "<label><input class=hide-dead type=checkbox> hide dead</label>"
            f" <span class=count></span> {esc(what)} shown · click a column header to sort</div>")

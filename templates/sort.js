(function () {
  "use strict";
  // Click a column header of a table.sortable to sort by it; click again to reverse.
  // A cell's data-sort attribute, when present, is its sort key; numbers sort before text, blanks last.
  function key(cell) {
    var raw = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent.trim();
    if (raw === "" || raw === "nan") { return { rank: 2, value: 0 }; }
    var num = Number(raw);
    if (isFinite(num)) { return { rank: 0, value: num }; }
    return { rank: 1, value: raw.toLowerCase() };
  }
  function compare(a, b) {
    if (a.rank !== b.rank) { return a.rank - b.rank; }
    if (a.value < b.value) { return -1; }
    if (a.value > b.value) { return 1; }
    return 0;
  }
  function sortBy(table, th, column) {
    var body = table.tBodies[0];
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    var rows = Array.prototype.slice.call(body.rows).map(function (row, index) {
      return { row: row, key: key(row.cells[column]), index: index };
    });
    rows.sort(function (a, b) {
      var c = compare(a.key, b.key);
      if (c !== 0 && a.key.rank !== 2 && b.key.rank !== 2 && !ascending) { c = -c; }
      return c !== 0 ? c : a.index - b.index;
    });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (other) {
      other.setAttribute("aria-sort", "none");
    });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    rows.forEach(function (item) { body.appendChild(item.row); });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    if (!table.tHead || !table.tBodies.length) { return; }
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, column) {
      var button = document.createElement("button");
      button.type = "button";
      button.className = "sort";
      while (th.firstChild) { button.appendChild(th.firstChild); }
      th.appendChild(button);
      th.setAttribute("aria-sort", "none");
      button.addEventListener("click", function () { sortBy(table, th, column); });
    });
  });
})();

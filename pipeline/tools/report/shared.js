// What the report's page and the comparison's share (included by both page.html files, inside their scope).
const el = (tag, attrs, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) { if (k === "class") e.className = v; else e.setAttribute(k, v); }
  for (const kid of kids) if (kid !== null && kid !== undefined) e.append(kid instanceof Node ? kid : String(kid));
  return e;
};
const fmt = (v, digits) => v === null || v === undefined ? "–" : (typeof v === "number" && digits !== undefined ? v.toFixed(digits) : String(v));

// every chart into #charts: its title, its note, the Vega-Lite spec drawn as SVG
function drawCharts(specs) {
  const charts = document.getElementById("charts");
  specs.forEach((c, i) => {
    const box = el("div", {class: "chart", id: "chart-" + i}, el("h3", {}, c.title), el("p", {class: "muted"}, c.note));
    const target = el("div", {class: "vega"});
    box.append(target); charts.append(box);
    vegaEmbed(target, c.spec, {actions: false, renderer: "svg"}).catch(e => console.error("chart " + c.title, e));
  });
}

// a row's images: thumbnails, links (never fetched), or why there is none
function thumbs(r) {
  const box = el("div", {class: "thumbs"});
  for (const im of r.images || []) {
    if (im.thumb) box.append(el("img", {class: "thumb", src: im.thumb, alt: "image of " + r.id, loading: "lazy"}));
    else if (im.link) box.append(el("a", {href: im.link, target: "_blank", rel: "noopener noreferrer"}, im.link));
    else if (im.note) box.append(el("span", {class: "note muted"}, im.note));
  }
  return box;
}

// the rows in view (their places in ROWS), `size` a page, drawn by `card` into `target`; #count,
// #page, #prev and #next tell and turn; `apply` makes the view again when #search is typed in
// (after a pause) or a select named in `selects` changes; `turned` after a page turn
function pager({target, size, total, card, apply, selects, turned = () => {}}) {
  let page = 0, view = [];
  function render() {
    const pages = Math.max(1, Math.ceil(view.length / size));
    page = Math.min(Math.max(0, page), pages - 1);
    target.replaceChildren(...view.slice(page * size, (page + 1) * size).map(card));
    document.getElementById("count").textContent = `${view.length.toLocaleString()} of ${total.toLocaleString()} rows`;
    document.getElementById("page").textContent = `page ${page + 1} of ${pages}`;
    document.getElementById("prev").disabled = page === 0;
    document.getElementById("next").disabled = page >= pages - 1;
  }
  let typing;
  document.getElementById("search").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(apply, 150); });
  for (const id of selects) document.getElementById(id).addEventListener("change", apply);
  document.getElementById("prev").addEventListener("click", () => { page--; render(); turned(); });
  document.getElementById("next").addEventListener("click", () => { page++; render(); turned(); });
  return {show(rows) { view = rows; page = 0; render(); }};
}

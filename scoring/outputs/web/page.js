// The results page's script: plain JavaScript, no framework, no network. It reads the run's data
// (the JSON element "run-data": the results.json record and one row per image) and keeps the
// table, the selected image, the counts and the ROC point in step with the threshold.
"use strict";

const DATA = JSON.parse(document.getElementById("run-data").textContent);
const RECORD = DATA.record;
const ROWS = DATA.rows.map((row, index) => Object.assign({index: index + 1}, row));
const LABELLED = ROWS.some((row) => row.label !== null && row.label !== undefined);
const BOTH_CLASSES = LABELLED && ROWS.some((r) => r.label === 1) && ROWS.some((r) => r.label === 0);
const RUN_THRESHOLD = typeof DATA.threshold === "number" && isFinite(DATA.threshold) ? DATA.threshold : null;
const SCORES = ROWS.map((r) => r.score);
// The slider's value is the threshold (score units, from just below the lowest score to the
// highest); dragged it is linear, and its arrow keys step from one verdict change to the next:
// "position" p puts the threshold between the p-th and (p+1)-th distinct score, p = 0 below
// every score, the last at the highest (one outlier would otherwise make each step coarse).
const DISTINCT = [...new Set(SCORES.filter((v) => isFinite(v)))].sort((a, b) => a - b);
const HIGH = DISTINCT.length ? DISTINCT[DISTINCT.length - 1] : 1;

const state = {
  threshold: RUN_THRESHOLD === null ? HIGH : RUN_THRESHOLD,
  sortKey: "score", sortDir: -1, order: [], selected: null, elements: new Map(), limit: 0,
};

const $ = (id) => document.getElementById(id);

function thresholdAt(position) {
  if (!DISTINCT.length) return 0;
  if (position <= 0) return DISTINCT[0] - Math.max(1e-9, Math.abs(DISTINCT[0]) * 1e-6);
  if (position >= DISTINCT.length) return DISTINCT[DISTINCT.length - 1];
  return (DISTINCT[position - 1] + DISTINCT[position]) / 2;
}

// How many distinct scores are at or below ``value`` (the slider's position for it).
function positionOf(value) {
  let low = 0, high = DISTINCT.length;
  while (low < high) { const mid = (low + high) >> 1; if (DISTINCT[mid] <= value) low = mid + 1; else high = mid; }
  return low;
}

// A heatmap's path as a URL: each part encoded, so "#", "?" and "%" in a file name stay its name.
const url = (path) => path.split("/").map(encodeURIComponent).join("/");
// 4 significant digits, no trailing zeros after the point (2569.98 -> 2570, 0.25000 -> 0.25)
const fmt = (v) => (v === null || v === undefined || !isFinite(v)) ? "n/a" : String(parseFloat(Number(v).toPrecision(4)));
const metric = (v) => (v === null || v === undefined || !isFinite(v)) ? "n/a" : Number(v).toFixed(4);
const esc = (text) => String(text).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;", "'": "&#39;"})[c]);

// The one rule of the project: anomalous when score > threshold.
const isAnomalous = (row) => row.score > state.threshold;
const verdictOf = (row) => isAnomalous(row) ? "anomalous" : "normal";
const isWrong = (row) => LABELLED && row.label !== null && (row.label === 1) !== isAnomalous(row);

function counts() {
  const c = {above: 0, below: 0, tp: 0, fp: 0, tn: 0, fn: 0};
  for (const row of ROWS) {
    const above = isAnomalous(row);
    c[above ? "above" : "below"] += 1;
    if (LABELLED && row.label !== null) {
      if (row.label === 1) c[above ? "tp" : "fn"] += 1; else c[above ? "fp" : "tn"] += 1;
    }
  }
  return c;
}

function renderCounts() {
  const c = counts();
  const parts = [`<span>anomalous <b id="count-above">${c.above}</b></span>`,
                 `<span>normal <b id="count-below">${c.below}</b></span>`];
  if (LABELLED) {
    const precision = c.tp + c.fp ? c.tp / (c.tp + c.fp) : null;
    const recall = c.tp + c.fn ? c.tp / (c.tp + c.fn) : null;
    const f1 = precision !== null && recall !== null && precision + recall > 0 ? 2 * precision * recall / (precision + recall) : null;
    parts.push(`<span title="defective, called anomalous">true positives <b id="tp">${c.tp}</b></span>`,
               `<span title="good, called anomalous">false positives <b id="fp">${c.fp}</b></span>`,
               `<span title="good, called normal">true negatives <b id="tn">${c.tn}</b></span>`,
               `<span title="defective, called normal">false negatives <b id="fn">${c.fn}</b></span>`,
               `<span>precision <b id="precision">${metric(precision)}</b></span>`,
               `<span>recall <b id="recall">${metric(recall)}</b></span>`,
               `<span>F1 <b id="f1">${metric(f1)}</b></span>`);
  }
  $("counts").innerHTML = parts.join("");
}

// The scoring command that gives this run's verdicts at the threshold now set (made in page.py).
function snippet() {
  $("threshold-snippet").textContent = `${DATA.rerun} --threshold ${state.threshold}`;
}

function sortValue(row, key) {
  if (key === "normalised") return row.score;  // the same order as the score's (one run threshold)
  if (key === "verdict") return isAnomalous(row) ? 1 : 0;
  return row[key] === null || row[key] === undefined ? "" : row[key];
}

function visibleRows() {
  const verdict = $("filter-verdict").value, defect = $("filter-defect").value;
  const wrongOnly = $("filter-wrong").checked, text = $("filter-text").value.trim().toLowerCase();
  const rows = ROWS.filter((row) => (!verdict || verdictOf(row) === verdict) && (!defect || row.defect === defect)
    && (!wrongOnly || isWrong(row)) && (!text || row.file.toLowerCase().includes(text)));
  const key = state.sortKey, dir = state.sortDir;
  rows.sort((a, b) => {
    const x = sortValue(a, key), y = sortValue(b, key);
    return (x < y ? -1 : x > y ? 1 : 0) * dir || a.index - b.index;
  });
  return rows;
}

const verdictText = (row) => verdictOf(row) + (isWrong(row) ? " (wrong)" : "");
// Rows drawn at a time: a table of tens of thousands lays out slowly, and no one reads past the
// first few hundred in an order; the rest come with "show more" or when stepped to.
const PAGE = 500;

function renderTable(keepLimit = false) {
  const rows = visibleRows();
  state.order = rows.map((row) => row.index);
  if (!keepLimit) state.limit = PAGE;
  const at = state.order.indexOf(state.selected);
  if (at >= state.limit) state.limit = (Math.floor(at / PAGE) + 1) * PAGE;  // the selected row stays drawn
  const html = rows.slice(0, state.limit).map((row) => {
    const classes = [isWrong(row) ? "wrong" : "", row.index === state.selected ? "selected" : ""].join(" ").trim();
    return `<tr data-index="${row.index}" class="${classes}"><td class="num">${row.index}</td>` +
      `<td class="file" title="${esc(row.file)}">${esc(row.file)}</td>` +
      (LABELLED ? `<td>${esc(row.defect)}</td>` : "") +
      `<td class="num">${fmt(row.score)}</td>` +
      // As scores.csv's normalized_score: the run's threshold is 1.0, whatever the slider says.
      `<td class="num">${RUN_THRESHOLD > 0 ? (row.score / RUN_THRESHOLD).toFixed(3) : "n/a"}</td>` +
      `<td class="verdict-${verdictOf(row)}">${verdictText(row)}</td></tr>`;
  }).join("");
  const body = document.querySelector("#images tbody");
  const more = rows.length - state.limit;
  body.innerHTML = html + (more > 0 ? `<tr class="more"><td colspan="6"><button id="more" type="button">show ` +
    `${Math.min(more, PAGE)} more (${more} not drawn)</button></td></tr>` : "");
  state.elements = new Map([...body.querySelectorAll("tr[data-index]")].map((tr) => [Number(tr.dataset.index), tr]));
  $("shown").textContent = `${rows.length} of ${ROWS.length} images`;
  document.querySelectorAll("#images th").forEach((th) => {
    th.classList.toggle("sorted-asc", th.dataset.key === state.sortKey && state.sortDir === 1);
    th.classList.toggle("sorted-desc", th.dataset.key === state.sortKey && state.sortDir === -1);
  });
  if (!state.order.includes(state.selected) && state.order.length) select(state.order[0], false);
  else renderViewer();
}

function select(index, scroll = true) {
  const previous = state.elements.get(state.selected);
  if (previous) previous.classList.remove("selected");
  state.selected = index;
  if (!state.elements.has(index) && state.order.includes(index)) renderTable(true);  // stepped past the drawn rows
  const tr = state.elements.get(index);
  if (tr) {
    tr.classList.add("selected");
    if (scroll) tr.scrollIntoView({block: "nearest"});
  }
  renderViewer();
}

function step(delta) {
  if (!state.order.length) return;
  const at = state.order.indexOf(state.selected);
  const next = at < 0 ? 0 : Math.min(Math.max(at + delta, 0), state.order.length - 1);
  select(state.order[next]);
}

function renderViewer() {
  const row = state.order.includes(state.selected) ? ROWS[state.selected - 1] : null;
  const img = $("viewer-img");
  if (!row) {
    $("viewer-title").textContent = "no image in the current filter";
    $("viewer-score").textContent = ""; $("viewer-pos").textContent = "";
    img.removeAttribute("src"); img.alt = "";
    return;
  }
  const verdict = verdictOf(row);
  $("viewer-pos").textContent = `${state.order.indexOf(row.index) + 1} / ${state.order.length}`;
  $("viewer-title").textContent = row.file;
  $("viewer-score").innerHTML = `score <b>${fmt(row.score)}</b> / threshold ${fmt(state.threshold)} &rarr; ` +
    `<span class="verdict-${verdict}">${verdict.toUpperCase()}</span>` +
    (LABELLED ? ` &nbsp; (truth: ${esc(row.defect)}${isWrong(row) ? ", <b>wrong</b>" : ""})` : "");
  // The panel was drawn once, at the run's threshold: say so when another one is set.
  $("viewer-note").textContent = RUN_THRESHOLD === null ? "This run has no threshold: the slider starts above every score."
    : state.threshold !== RUN_THRESHOLD ? `The picture's red region and colour scale are the run's threshold's (${fmt(RUN_THRESHOLD)}).` : "";
  if (row.heatmap) {
    if (img.getAttribute("src") !== url(row.heatmap)) img.setAttribute("src", url(row.heatmap));
    img.alt = `panel of ${row.file}: image, heatmap, ${LABELLED ? "ground truth and " : ""}prediction`;
  } else {
    img.removeAttribute("src"); img.alt = "no picture";
  }
}

// ``from``: the control the value came from, which is left as the user set it.
function setThreshold(value, from = null) {
  if (!isFinite(value)) return;
  const previous = state.threshold;
  state.threshold = value;
  if (from !== "range") $("threshold-range").value = String(value);
  if (from !== "number") $("threshold-value").value = String(value);
  renderCounts(); snippet(); verdictsChanged(previous); renderRocPoint();
}

// The table after a threshold move: rebuilt where its rows or order depend on the verdicts, else
// only the rows whose score lies between the two thresholds (their verdict flipped) are touched,
// so the slider stays smooth on a test set of thousands.
function verdictsChanged(previous) {
  if ($("filter-verdict").value || $("filter-wrong").checked || state.sortKey === "verdict") return renderTable();
  const low = Math.min(previous, state.threshold), high = Math.max(previous, state.threshold);
  for (const row of ROWS) {
    const tr = row.score > low && row.score <= high ? state.elements.get(row.index) : null;
    if (!tr) continue;
    const cell = tr.cells[tr.cells.length - 1];
    cell.className = `verdict-${verdictOf(row)}`;
    cell.textContent = verdictText(row);
    tr.classList.toggle("wrong", isWrong(row));
  }
  renderViewer();
}

// ---- the image ROC curve (test sets with both classes) --------------------------------------
const ROC_SIZE = 260, ROC_PAD = 34;
const rocX = (fpr) => ROC_PAD + fpr * ROC_SIZE, rocY = (tpr) => ROC_PAD / 2 + (1 - tpr) * ROC_SIZE;

function rocPoints() {
  const positives = ROWS.filter((r) => r.label === 1).length, negatives = ROWS.length - positives;
  const sorted = ROWS.slice().sort((a, b) => b.score - a.score);
  const points = [[0, 0]];
  let tp = 0, fp = 0;
  sorted.forEach((row, i) => {
    if (row.label === 1) tp += 1; else fp += 1;
    if (i === sorted.length - 1 || sorted[i + 1].score !== row.score) points.push([fp / negatives, tp / positives]);
  });
  return points;
}

function renderRoc() {
  if (!BOTH_CLASSES) {
    if (LABELLED) $("roc").innerHTML = `<p class="hint">needs good and defective images</p>`;
    else $("roc-card").hidden = true;  // new images: no labels, no curve
    return;
  }
  const path = rocPoints().map(([f, t], i) => `${i ? "L" : "M"}${rocX(f).toFixed(1)},${rocY(t).toFixed(1)}`).join("");
  const ticks = [0, 0.5, 1].map((v) => `<text x="${rocX(v)}" y="${rocY(0) + 14}" text-anchor="middle">${v}</text>` +
    `<text x="${ROC_PAD - 6}" y="${rocY(v) + 4}" text-anchor="end">${v}</text>`).join("");
  $("roc").innerHTML = `<svg viewBox="0 0 ${ROC_SIZE + ROC_PAD + 10} ${ROC_SIZE + ROC_PAD + 14}" font-size="11">` +
    `<rect x="${rocX(0)}" y="${rocY(1)}" width="${ROC_SIZE}" height="${ROC_SIZE}" fill="none" stroke="#999"/>` +
    `<line x1="${rocX(0)}" y1="${rocY(0)}" x2="${rocX(1)}" y2="${rocY(1)}" stroke="#bbb" stroke-dasharray="4 3"/>` +
    `<path d="${path}" fill="none" stroke="#3b6fd8" stroke-width="2"/>${ticks}` +
    `<text x="${rocX(0.5)}" y="${rocY(0) + 28}" text-anchor="middle">false positive rate</text>` +
    `<text transform="translate(10 ${rocY(0.5)}) rotate(-90)" text-anchor="middle">true positive rate</text>` +
    `<circle id="roc-point" r="5" fill="#c00000"/></svg>` +
    `<p class="hint">AUROC ${metric((RECORD.metrics || {}).image_auroc)}; the red point is the threshold set above: ` +
    `<span id="roc-point-text"></span></p>`;
  renderRocPoint();
}

function renderRocPoint() {
  const point = $("roc-point");
  if (!point) return;
  const c = counts();
  const fpr = c.fp / (c.fp + c.tn), tpr = c.tp / (c.tp + c.fn);
  point.setAttribute("cx", rocX(fpr)); point.setAttribute("cy", rocY(tpr));
  $("roc-point-text").textContent = `false positive rate ${fpr.toFixed(3)}, true positive rate ${tpr.toFixed(3)}`;
}

// ---- metrics, settings, provenance ----------------------------------------------------------
function table(pairs) {
  return `<table>${pairs.map(([k, v]) => `<tr><th>${esc(k)}</th><td>${esc(v)}</td></tr>`).join("")}</table>`;
}

function plain(value) {
  if (value === null || value === undefined) return "none";
  if (Array.isArray(value)) return value.join(", ");
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function renderDetails() {
  const m = RECORD.metrics || {};
  const names = {image_auroc: "image AUROC", pixel_auroc: "pixel AUROC", aupro: "AUPRO", image_f1_max: "image F1-max",
                 pixel_ap: "pixel AP", pixel_auroc_paper_masks: "pixel AUROC (paper's masks)"};
  let html = "";
  if (RECORD.metrics) {
    html += table(Object.entries(names).filter(([k]) => k in m).map(([k, name]) => [name, metric(m[k])]));
    const perDefect = RECORD.per_defect_image_auroc || {};
    if (Object.keys(perDefect).length) {
      html += `<h2>Image AUROC per defect type</h2>` +
        table(Object.entries(perDefect).map(([d, v]) => [d, metric(v)]));
    }
    const missing = RECORD.unavailable_metrics || {};
    if (Object.keys(missing).length) html += `<p class="hint">${esc(Object.entries(missing).map(([k, v]) => `${k}: ${v}`).join("; "))}</p>`;
  } else {
    html += `<p>${RECORD.images.scored} new images scored, ${RECORD.images.skipped.length} skipped; no labels, so no metrics.</p>`;
  }
  const t = RECORD.threshold || {};
  html += `<p class="hint">run's threshold ${fmt(t.value)} (${esc(t.source || t.rule || "calibrated on the training images")})</p>`;
  const scale = (RECORD.pictures || {}).heat_scale;
  if (scale) html += `<p class="hint">heatmap colours: ${fmt(scale.low)} .. ${fmt(scale.high)} (${esc(scale.rule)}), the same for every image, clipped beyond</p>`;
  $("metrics").innerHTML = html;
  $("settings").innerHTML = table(Object.entries(RECORD.settings || {}).map(([k, v]) => [k, plain(v)]));
  const ckpt = RECORD.checkpoint || {}, bank = RECORD.bank || {};
  $("provenance").innerHTML = table([
    ["checkpoint", plain(ckpt.path)], ["checkpoint sha256", plain(ckpt.sha256)],
    ["bank patches", plain(bank.patches)], ["bank training images", plain(bank.train_images)],
    ["git commit", plain(RECORD.git_commit)], ["seed", plain(RECORD.seed)], ["command", plain(RECORD.command)],
    ["versions", Object.entries(RECORD.versions || {}).map(([k, v]) => `${k} ${v}`).join(", ")], ["folder", plain(RECORD.out_dir)],
    ["ms per image", RECORD.timings ? (RECORD.timings.s_per_test_image * 1000).toFixed(0) : "n/a"],
  ]);
}

function headline() {
  const m = RECORD.metrics;
  const what = m ? `${ROWS.length} test images: image AUROC ${metric(m.image_auroc)}, pixel AUROC ${metric(m.pixel_auroc)}, ` +
                   `AUPRO ${metric(m.aupro)}` : `${ROWS.length} new images from ${RECORD.images.folder}`;
  $("headline").textContent = `${what}. Keys: up/down (or k/j) step through the images in the table's order.`;
}

// ---- wiring ---------------------------------------------------------------------------------
function setup() {
  const range = $("threshold-range");
  const low = Math.min(thresholdAt(0), RUN_THRESHOLD === null ? Infinity : RUN_THRESHOLD);
  range.min = String(low); range.max = String(Math.max(HIGH, RUN_THRESHOLD === null ? -Infinity : RUN_THRESHOLD));
  range.step = "any";
  range.addEventListener("input", () => setThreshold(Number(range.value), "range"));
  range.addEventListener("keydown", (e) => {
    const delta = {ArrowRight: 1, ArrowUp: 1, ArrowLeft: -1, ArrowDown: -1}[e.key];
    if (!delta) return;
    e.preventDefault();
    setThreshold(thresholdAt(Math.min(Math.max(positionOf(state.threshold) + delta, 0), DISTINCT.length)));
  });
  // An empty, half-typed ("1e") or infinite number is not a threshold: the last one stays, and
  // the box shows it again when left.
  const box = $("threshold-value");
  box.addEventListener("input", () => box.value !== "" && isFinite(Number(box.value)) && setThreshold(Number(box.value), "number"));
  box.addEventListener("change", () => { if (Number(box.value) !== state.threshold || box.value === "") box.value = String(state.threshold); });
  $("threshold-reset").addEventListener("click", () => setThreshold(RUN_THRESHOLD === null ? HIGH : RUN_THRESHOLD));
  $("threshold-reset").disabled = RUN_THRESHOLD === null;
  $("copy-snippet").addEventListener("click", () => {
    const text = $("threshold-snippet").textContent;
    if (navigator.clipboard) navigator.clipboard.writeText(text).catch(() => {});
    window.getSelection().selectAllChildren($("threshold-snippet"));
  });
  if (LABELLED) {
    const defects = [...new Set(ROWS.map((r) => r.defect))].sort();
    $("filter-defect").innerHTML += defects.map((d) => `<option value="${esc(d)}">${esc(d)}</option>`).join("");
  } else {
    document.querySelectorAll(".labelled").forEach((el) => el.remove());
    $("filter-defect-label").hidden = true; $("filter-wrong-label").hidden = true;  // (their values: all, off)
  }
  for (const id of ["filter-verdict", "filter-defect", "filter-wrong", "filter-text"]) {
    $(id).addEventListener(id === "filter-text" ? "input" : "change", () => renderTable());
  }
  document.querySelectorAll("#images th").forEach((th) => th.addEventListener("click", () => {
    const key = th.dataset.key;
    state.sortDir = state.sortKey === key ? -state.sortDir : (key === "file" || key === "defect" || key === "index" ? 1 : -1);
    state.sortKey = key;
    renderTable();
  }));
  document.querySelector("#images tbody").addEventListener("click", (e) => {
    if (e.target.id === "more") { state.limit += PAGE; renderTable(true); return; }
    const tr = e.target.closest("tr[data-index]");
    if (tr) select(Number(tr.dataset.index), false);
  });
  $("prev").addEventListener("click", () => step(-1));
  $("next").addEventListener("click", () => step(1));
  document.addEventListener("keydown", (e) => {
    // Typing goes to the text and number boxes; the arrows to the control that has them (the slider).
    if (e.target.matches("input[type=number], input[type=search], textarea") || e.altKey || e.ctrlKey || e.metaKey) return;
    if ((e.key === "ArrowDown" || e.key === "ArrowUp") && e.target.matches("input[type=range], select")) return;
    if (e.key === "ArrowDown" || e.key === "j") { step(1); e.preventDefault(); }
    if (e.key === "ArrowUp" || e.key === "k") { step(-1); e.preventDefault(); }
  });
  headline(); renderDetails(); renderRoc(); renderTable();
  setThreshold(state.threshold);
}

setup();

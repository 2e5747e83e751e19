"""The report page: one HTML string with its styles, plots, images and a few lines of script inside, so it opens
from disk with no server and fetches nothing (its Content-Security-Policy forbids any request)."""
from __future__ import annotations

import json
import time
from html import escape
from typing import Any, Iterable

import numpy as np

from gradcam_engine.report import svg
from gradcam_engine.report.data import Card, ReportData
from gradcam_engine.report.images import heat_uri

MEAN_CAM_CLASSES = 24  # most frequent predicted classes shown with their mean CAM
MATRIX_CLASSES = 30    # largest confusion matrix drawn in the page; metrics.json always has it

CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")

STYLE = """
:root { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2433; }
body { margin: 0 auto; max-width: 1240px; padding: 18px 24px 48px; background: #fbfbfd; }
h1 { font-size: 22px; margin: 0 0 2px; } h2 { font-size: 18px; margin: 28px 0 10px; border-bottom: 1px solid #dde;
  padding-bottom: 4px; } h3 { font-size: 15px; margin: 16px 0 6px; }
h1, .sub, .fact { overflow-wrap: anywhere; }
.sub { color: #667; margin: 0 0 12px; } .warn { background: #fff4d6; border: 1px solid #e8c766; padding: 6px 10px; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap: 8px; }
.fact { background: #fff; border: 1px solid #e3e5ee; border-radius: 6px; padding: 7px 10px; }
.fact b { display: block; font-size: 17px; } .fact span { color: #667; font-size: 12px; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; background: #fff; font-size: 13px; }
th, td { border: 1px solid #e3e5ee; padding: 3px 8px; text-align: right; } th { background: #f1f2f7; }
td.l, th.l { text-align: left; } td a { color: #3b6fb6; text-decoration: none; cursor: pointer; }
.plots { display: flex; flex-wrap: wrap; gap: 14px; } .plot { background: #fff; border: 1px solid #e3e5ee; }
svg.plot { max-width: 100%; height: auto; }
.plot .axis { stroke: #889; } .plot .grid { stroke: #e6e7ee; } .plot text { font-size: 10px; fill: #445; }
.plot .label { font-size: 11px; } .plot .legend { font-size: 11px; }
.plot .heading { font-size: 12px; font-weight: 600; fill: #1d2433; }
.maps { display: flex; flex-wrap: wrap; gap: 10px; } .map { text-align: center; font-size: 12px; }
.map img { display: block; image-rendering: auto; border: 1px solid #e3e5ee; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
.card { background: #fff; border: 1px solid #e3e5ee; border-radius: 6px; padding: 6px; width: 214px;
  font-size: 12px; } .card[hidden] { display: none; }
.card img { display: block; max-width: 200px; margin: 0 auto 2px; } .card .path { color: #667; word-break: break-all; }
.card .bad { color: #b3261e; font-weight: 600; } .card .good { color: #1e7b34; }
.thumbs { display: flex; gap: 4px; flex-wrap: wrap; } .thumbs figure { margin: 0; }
figcaption { font-size: 11px; color: #667; text-align: center; }
.errors td { text-align: left; font-family: ui-monospace, monospace; font-size: 12px; }
select { font-size: 14px; padding: 2px 6px; }
"""

SCRIPT = """
(function () {
  var select = document.getElementById('class-filter');
  if (!select) { return; }
  function apply() {
    var wanted = select.value;
    document.querySelectorAll('.gallery-section').forEach(function (section) {
      var shown = 0;
      section.querySelectorAll('.card').forEach(function (card) {
        var classes = JSON.parse(card.getAttribute('data-classes'));
        var show = !wanted || classes.indexOf(wanted) >= 0;
        card.hidden = !show;
        if (show) { shown += 1; }
      });
      section.querySelector('.shown').textContent = String(shown);
    });
  }
  select.addEventListener('change', apply);
  document.querySelectorAll('[data-filter]').forEach(function (link) {
    link.addEventListener('click', function (event) {
      event.preventDefault();
      select.value = link.getAttribute('data-filter');
      apply();
      document.getElementById('gallery').scrollIntoView();
    });
  });
  apply();
})();
"""


def _pct(value: float | None) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.1%}"


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _fact(value: Any, label: str) -> str:
    return f'<div class="fact"><b>{escape(str(value))}</b><span>{escape(label)}</span></div>'


def _table(header: list[str], rows: Iterable[list[str]], left: int = 1, cls: str = "") -> str:
    """A table of already-escaped cells; the first `left` columns align left. Wider than the page's column (many
    methods or classes), it scrolls sideways inside its own box and the page does not."""
    head = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def summary(data: ReportData) -> str:
    """The run: counts, errors, throughput, device, precision, artifact, methods."""
    info, manifest = data.info, data.manifest or {}
    counts, throughput = info.get("counts") or {}, info.get("throughput") or {}
    options = info.get("options") or {}
    session = options.get("session") or {}
    facts = [
        _fact(f"{data.counts['rows']:,}", "inputs with a result row"),
        _fact(f"{data.counts['ok']:,}", "explained (status ok)"),
        _fact(f"{data.error_count:,}", "errors"),
        _fact(f"{counts.get('skipped_non_image', 0):,}", "files skipped as non-images"),
        _fact(f"{_num(throughput.get('images_per_second'), 1)} img/s",
              f"throughput ({_num(throughput.get('seconds'), 1)} s, last session of the run)"),
        _fact(f"{session.get('backend', '–')} on {info.get('device', '–')}", "runtime and device"),
        _fact(info.get("precision", "–"), "precision"),
        _fact(", ".join(data.methods), "CAM methods"),
        _fact(manifest.get("target_layer", "–"), "target layer"),
        _fact(f"{manifest.get('input', {}).get('height', '?')}×{manifest.get('input', {}).get('width', '?')}, "
              f"{len(data.class_names)} classes", "model input, classes"),
        _fact(manifest.get("score", "–"), "score differentiated"),
        _fact(info.get("artifact", "–"), "artifact"),
    ]
    status = info.get("status")
    warn = "" if status == "complete" else (f'<p class="warn">run.json says the run is <b>{escape(str(status))}</b>: '
                                            "it was interrupted or is still running; this report shows the rows "
                                            "committed so far.</p>")
    when = f"started {info.get('started', '?')}, finished {info.get('finished', '–')}"
    versions = ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items())
    return (f"<h2>Run</h2>{warn}<div class=\"facts\">{''.join(facts)}</div>"
            f'<p class="sub">{escape(when)}; model {escape(str(manifest.get("model_name", "?")))}; '
            f"{escape(versions)}</p>")


def evaluation(data: ReportData) -> str:
    """What `gradcam evaluate` found, per method, with the options it used."""
    metrics = data.metrics
    if not metrics and data.evaluation_interrupted:
        return ("<h2>Evaluation</h2><p class=\"warn\">An evaluation of this run did not finish (metrics.json says it "
                "is running): run the same <code>gradcam evaluate</code> command again to complete it, then build "
                "the report again.</p>")
    if not metrics:
        return ("<h2>Evaluation</h2><p class=\"sub\">Not evaluated: run <code>gradcam evaluate RUN_DIR --labels ... "
                "--boxes ... --faithfulness drop,deletion,insertion</code> and build the report again for accuracy, "
                "pointing game, IoU and faithfulness.</p>")
    counts = metrics["counts"]
    facts = [_fact(f"{counts['labelled']:,} / {counts['unlabelled']:,}", "ok inputs with / without a label"),
             _fact(f"{counts['with_boxes']:,} / {counts['without_boxes']:,}", "ok inputs with / without boxes")]
    classification = metrics.get("classification")
    if classification:
        facts = [_fact(_pct(classification["accuracy"]), "accuracy"),
                 _fact(f"{_pct(classification['macro_precision'])} / {_pct(classification['macro_recall'])}",
                       "macro precision / recall")] + facts
    if counts.get("faithfulness_errors"):
        facts.append(_fact(counts["faithfulness_errors"], "inputs not read back for faithfulness"))
    header = ["method", "pointing game", "… of correct", "energy PG", "IoU@0.5", "Average Drop ↓",
              "Increase in Conf. ↑", "deletion AUC ↓", "insertion AUC ↑"]
    rows = [[escape(m), _pct(f.get("pointing_game")), _pct(f.get("pointing_game_correct")),
             _num(f.get("energy_pointing_game")), _num(f.get("iou")), _pct(f.get("average_drop")),
             _pct(f.get("increase_in_confidence")), _num(f.get("deletion_auc")), _num(f.get("insertion_auc"))]
            for m, f in metrics["overall"].items()]
    options = metrics.get("options") or {}
    truth = metrics.get("ground_truth") or {}
    notes = []
    for name, source in truth.items():
        if source:
            extra = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in source.items()
                              if k not in ("source",) and v)
            notes.append(f"{name}: {source.get('source')} ({extra})")
    if options.get("faithfulness"):
        probe = metrics.get("faithfulness_probe") or {}
        ran = (f" through the {probe['precision']} graph (the run: {probe['run_precision']})"
               if probe and probe["precision"] != probe["run_precision"] else "")
        notes.append(f"faithfulness {','.join(options['faithfulness'])}, K = {options.get('steps')}, baseline "
                     f"{options.get('baseline')}{ran}")
    if len(data.scored_methods) < len(data.methods):
        notes.append(f"evaluated methods: {', '.join(data.scored_methods)} of {', '.join(data.methods)}")
    return (f"<h2>Evaluation</h2><div class=\"facts\">{''.join(facts)}</div><h3>Per method</h3>"
            f"{_table(header, rows)}<p class=\"sub\">{escape('; '.join(notes))}</p>")


def per_class(data: ReportData) -> str:
    """One row per class: predictions, confidence, and when evaluated recall, precision and the box metrics."""
    metrics = data.metrics or {}
    classification = (metrics.get("classification") or {}).get("per_class", {})
    by_class = metrics.get("per_class", {})
    scored = data.scored_methods
    first = scored[0]
    header = ["class", "predicted", "mean confidence"]
    if classification:
        header += ["support", "precision", "recall"]
    if by_class:
        header += [f"{escape(m)} pointing game" for m in scored] + [f"{escape(first)} energy PG",
                                                                    f"{escape(first)} IoU"]
    rows = []
    for i, name in enumerate(data.class_names):
        stats = data.per_class.get(i, {})
        if not stats and name not in classification and name not in by_class:
            continue
        link = f'<a href="#gallery" data-filter="{escape(name)}">{escape(name)}</a>'
        row = [link, f"{stats.get('images', 0):,}", _pct(stats.get("mean_confidence"))]
        if classification:
            c = classification.get(name, {})
            row += [f"{c.get('support', 0):,}", _pct(c.get("precision")), _pct(c.get("recall"))]
        if by_class:
            m = by_class.get(name, {})
            row += [_pct(m.get(method, {}).get("pointing_game")) for method in scored]
            row += [_num(m.get(first, {}).get("energy_pointing_game")), _num(m.get(first, {}).get("iou"))]
        rows.append(row)
    by = metrics.get("per_class_by", "predicted_class")
    note = ("Box metrics per class group inputs by their label." if by == "label"
            else "Box metrics per class group inputs by the predicted class (no labels).") if by_class else ""
    return f"<h2>Per class</h2>{_table(header, rows)}<p class=\"sub\">{note} Click a class to filter the gallery.</p>"


def confusion(data: ReportData) -> str:
    classification = (data.metrics or {}).get("classification")
    if not classification:
        return ""
    matrix = np.asarray(classification["confusion_matrix"]["matrix"])
    names = classification["confusion_matrix"]["classes"]
    if len(names) > MATRIX_CLASSES:
        return f"<p class=\"sub\">Confusion matrix ({len(names)} classes): see metrics.json.</p>"
    header = ["label \\ predicted"] + [escape(n) for n in names]
    rows = [[escape(names[i])] + [str(v) if v else "·" for v in matrix[i]] for i in range(len(names))]
    return f"<h3>Confusion matrix</h3>{_table(header, rows)}"


def plots(data: ReportData) -> str:
    """Confidence, mean CAM per predicted class, where peaks fall, and metric distributions when evaluated."""
    out = ["<h2>Plots</h2><div class=\"plots\">"]
    if data.confidence_labelled is not None:
        right = data.confidence_correct
        series = {"correct": data.confidence_labelled[right], "misclassified": data.confidence_labelled[~right]}
    else:
        series = {"ok inputs": data.confidence}
    hi = 1.0 if not len(data.confidence) or data.confidence.max() <= 1.0 else float(data.confidence.max())
    lo = 0.0 if not len(data.confidence) or data.confidence.min() >= 0.0 else float(data.confidence.min())
    out.append(svg.histogram(series, lo, hi, "Confidence of the predicted class", "predicted score"))
    for m in data.methods:
        values = data.metric_values.get(m)
        if not values:
            continue
        for name, title in (("energy", "energy inside boxes"), ("iou", "IoU@0.5 with boxes"),
                            ("drop", "drop in confidence"), ("deletion_auc", "deletion AUC"),
                            ("insertion_auc", "insertion AUC")):
            v = values[name][np.isfinite(values[name])]
            if len(v):
                out.append(svg.histogram({name: v}, 0.0, max(1.0, float(v.max())), f"{m}: {title}", title))
        overall = (data.metrics or {}).get("overall", {}).get(m, {})
        curves = {k: overall[f"{k}_curve"] for k in ("deletion", "insertion") if overall.get(f"{k}_curve")}
        if curves:
            out.append(svg.lines(curves, f"{m}: mean target score as pixels are deleted / inserted",
                                 "fraction of pixels, most salient first"))
        per_class_pg = {name: f.get(m, {}).get("pointing_game")
                        for name, f in (data.metrics or {}).get("per_class", {}).items()}
        if any(v is not None for v in per_class_pg.values()) and len(per_class_pg) <= 40:
            out.append(svg.bars(per_class_pg, f"{m}: pointing game per class"))
    out.append("</div>")
    out.append("<h3>Mean CAM per predicted class</h3>")
    ranked = sorted(data.per_class, key=lambda c: -data.per_class[c]["images"])[:MEAN_CAM_CLASSES]
    for m in data.methods:
        maps = [f'<div class="map"><img alt="mean {escape(m)} CAM, {escape(_name(data, c))}" '
                f'src="{heat_uri(data.mean_cams[m][c])}" width="96"><div>{escape(_name(data, c))}</div>'
                f'<div class="sub">{data.per_class[c]["images"]:,} images</div></div>'
                for c in ranked if c in data.mean_cams.get(m, {})]
        out.append(f"<p class=\"sub\">{escape(m)} (each map scaled to its own maximum)</p>"
                   f"<div class=\"maps\">{''.join(maps)}</div>")
    out.append("<h3>Where the CAM peaks fall</h3><div class=\"maps\">")
    for m, cells in data.peaks.items():
        total = int(cells.sum())
        r, c = np.unravel_index(int(cells.argmax()), cells.shape)
        out.append(f'<div class="map"><img alt="peak density, {escape(m)}" src="{heat_uri(cells.astype(float), 160)}"'
                   f' width="160"><div>{escape(m)}: {total:,} peaks</div><div class="sub">most often cell '
                   f"({r}, {c}) of {cells.shape[0]}×{cells.shape[1]}: {cells[r, c] / max(total, 1):.1%}</div></div>")
    out.append("</div><p class=\"sub\">Each image's peak cell counted on the CAM's grid (the image stretched to it); "
               "a bright spot away from the centre hints at a shortcut the model learnt.</p>")
    return "".join(out)


def _name(data: ReportData, index: int) -> str:
    return data.class_names[index] if 0 <= index < len(data.class_names) else str(index)


def _card(card: Card, methods: list[str]) -> str:
    classes = sorted({card.predicted} | ({card.label} if card.label else set()))
    captions = len(methods) > 1
    thumbs = "".join(f'<figure><img alt="{escape(m)} overlay of {escape(card.path)}" src="{uri}">'
                     + (f"<figcaption>{escape(m)}</figcaption>" if captions else "") + "</figure>"
                     for m in methods if (uri := card.thumbnails.get(m)))
    if not thumbs:
        thumbs = '<p class="sub">image not readable now, and the run wrote no overlay of it</p>'
    lines = [f'<div class="thumbs">{thumbs}</div>',
             f"<div>predicted <b>{escape(card.predicted)}</b> {card.score:.3f}</div>"]
    if card.label is not None:
        verdict = "good" if card.label == card.predicted else "bad"
        lines.append(f'<div class="{verdict}">label {escape(card.label)}</div>')
    for m, s in card.scores.items():
        parts = []
        if s.get("pointing_hit") is not None:
            parts.append(("hit" if s["pointing_hit"] else "miss") + f", energy {_num(s['energy'], 2)}, "
                         f"IoU {_num(s['iou'], 2)}")
        if s.get("drop") is not None:
            parts.append(f"drop {_pct(s['drop'])}")
        if s.get("deletion_auc") is not None:
            parts.append(f"del {_num(s['deletion_auc'], 2)} / ins {_num(s['insertion_auc'], 2)}")
        if parts:
            lines.append(f"<div>{escape(m)}: {escape('; '.join(parts))}</div>")
    lines.append(f'<div class="path">{escape(card.path)} ({card.width}×{card.height})</div>')
    return (f"<div class=\"card\" data-classes=\"{escape(json.dumps(classes))}\">{''.join(lines)}</div>")


def gallery(data: ReportData) -> str:
    classes = sorted({c for cards in data.sections.values() for card in cards
                      for c in [card.predicted] + ([card.label] if card.label else [])})
    options = "".join(f'<option value="{escape(c)}">{escape(c)}</option>' for c in classes)
    out = [f'<h2 id="gallery">Gallery</h2><p>Class: <select id="class-filter"><option value="">all classes'
           f"</option>{options}</select> <span class=\"sub\">(predicted or labelled)</span></p>"]
    for title, cards in data.sections.items():
        if not cards:
            continue
        body = "".join(_card(c, data.methods) for c in cards)
        out.append(f'<section class="gallery-section"><h3>{escape(title)} (<span class="shown">{len(cards)}</span> '
                   f'of {len(cards)} shown)</h3><div class="gallery">{body}</div></section>')
    return "".join(out)


def errors(data: ReportData) -> str:
    if not data.error_count:
        return "<h2>Errors</h2><p class=\"sub\">No input failed.</p>"
    rows = [[escape(p), escape(e)] for p, e in data.errors]
    more = data.error_count - len(data.errors)
    tail = f"<p class=\"sub\">… and {more:,} more: read results/ where status = 'error'.</p>" if more > 0 else ""
    return f"<h2>Errors ({data.error_count:,})</h2>{_table(['path', 'error'], rows, left=2, cls='errors')}{tail}"


def render(data: ReportData) -> str:
    """The whole page."""
    title = f"gradcam report: {data.run_dir}"
    made = time.strftime("%Y-%m-%d %H:%M")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>{escape(title)}</title><style>{STYLE}</style></head><body>'
            f"<h1>{escape(title)}</h1><p class=\"sub\">report made {made}</p>"
            + summary(data) + evaluation(data) + per_class(data) + confusion(data) + plots(data) + gallery(data)
            + errors(data) + f"<script>{SCRIPT}</script></body></html>")

"""The report's HTML pages, rendered from the report's data (what report.json holds).

Plain HTML and inline CSS: the pages open from disk in any browser, with no server, script or network,
and fit a 1280-pixel-wide window: images shrink to their column, long names and keys wrap.
Every text that comes from the run (image names, cluster names, config) is escaped.
"""
from __future__ import annotations

import json
from collections import defaultdict
from html import escape
from pathlib import Path

import yaml

from pipeline.images import label_palette
from pipeline.outputs import IGNORE

_PALETTE = label_palette()
MAX_SKIPPED_ROWS = 200
PREVIEW = 6  # crops per cluster on the index page

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1, h2 { font-weight: 600; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: .25em .6em; border-bottom: 1px solid #eee;
  text-align: left; vertical-align: middle; } th { background: #f6f6f6; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 1em; height: 1em; border: 1px solid #888; vertical-align: -.15em; margin-right: .3em; }
.grid { display: flex; flex-wrap: wrap; gap: .6em; }
figure { margin: 0; width: 136px; font-size: 11px; color: #555; word-break: break-all; }
figure img { display: block; max-width: 128px; max-height: 128px; border: 3px solid transparent; }
figure.ignored img { border: 3px dashed #999; }
.preview img { height: 64px; width: auto; max-width: 128px; object-fit: contain; margin-right: 2px; vertical-align: middle; }
.missing { display: inline-block; padding: 1em; background: #f3f3f3; color: #888; font-size: 11px; }
img { max-width: 100%; height: auto; } code, .panels th, .wrap { overflow-wrap: anywhere; }
.panels { width: 100%; table-layout: fixed; } .panels th:first-child { width: 9em; }
.panels td { padding: 2px; } .panels img { display: block; }
.legend span { margin-right: 1em; white-space: nowrap; }
nav a { margin-right: 1em; } pre { background: #f6f6f6; padding: .8em; overflow: auto; font-size: 12px; }
.stale { color: #a60; }
"""


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>\n'
            f"<body>\n{body}\n</body></html>\n")


def _swatch(value: int) -> str:
    r, g, b = _PALETTE[3 * value:3 * value + 3]
    return f'<span class="swatch" style="background: rgb({r},{g},{b})"></span>'


def _img(src: str, alt: str, prefix: str = "", width: int | None = None, height: int | None = None) -> str:
    size = f' width="{width}" height="{height}"' if width and height else ""
    return f'<img src="{escape(prefix + src)}" alt="{escape(alt)}"{size}>'


def _class_value(value: int) -> str:
    return {0: "background (0)", IGNORE: "ignore (255)"}.get(value, f"class value {value}")


def _percent(value) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def _number(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _class(value, data: dict) -> str:
    """A ground-truth class by its name (see commands.evaluate.class_names)."""
    return "" if value is None else escape(data["against_labels"]["class_names"][value])


def _legend(data: dict) -> str:
    """Mask colours and names: background, each class with the cluster ids that make it, ignore."""
    members = defaultdict(list)
    for cluster in data["clusters"]:
        members[cluster["class_value"]].append(cluster["id"])
    names = {**dict(enumerate(data["classes"])), IGNORE: "ignore"}
    values = [0, *sorted(v for v in members if v not in (0, IGNORE)), IGNORE]
    entries = [f"<span>{_swatch(v)}{escape(names[v])}{_cluster_ids(members.get(v, []))}</span>" for v in values]
    return f'<p class="legend">{"".join(entries)}</p>'


def _cluster_ids(ids: list[int]) -> str:
    if not ids:
        return ""
    return f" (cluster{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))})"


def _crop_figure(crop: dict, prefix: str) -> str:
    caption = f"{escape(crop['image'])}<br>d = {crop['distance']:.3f}" + ("" if crop["core"] else " (ignored)")
    css = "" if crop["core"] else ' class="ignored"'
    picture = (_img(crop["file"], f"object {crop['row']} of {crop['image']}", prefix) if crop["file"]
               else '<span class="missing">photo unreadable</span>')
    return f"<figure{css}>{picture}<figcaption>{caption}</figcaption></figure>"


def cluster_page(data: dict, index: int) -> str:
    clusters = data["clusters"]
    cluster = clusters[index]
    links = ['<a href="../index.html">report</a>', '<a href="../index.html#clusters">all clusters</a>']
    if index > 0:
        links.append(f'<a href="{clusters[index - 1]["id"]}.html">&larr; {escape(clusters[index - 1]["name"])}</a>')
    if index + 1 < len(clusters):
        links.append(f'<a href="{clusters[index + 1]["id"]}.html">{escape(clusters[index + 1]["name"])} &rarr;</a>')
    facts = [f"cluster id {cluster['id']}, mask value {cluster['value']} in the pseudo masks; "
             f"{_class_value(cluster['class_value'])} in the export and in the report's masks",
             f"{cluster['objects']} objects, {cluster['core']} in the core (the others are ignore in the pseudo masks)"]
    if data["against_labels"]:
        facts.append(f"matched class: {_class(cluster.get('matched_class'), data) or 'none'}; purity "
                     f"{_percent(cluster.get('purity'))} ({_class(cluster.get('majority_class'), data)})")
    random_title = f"Random sample of the others ({len(cluster['random'])} of {max(cluster['objects'] - len(cluster['nearest']), 0)})"
    body = [f"<nav>{''.join(links)}</nav>", f"<h1>{_swatch(cluster['class_value'])}{escape(cluster['name'])}</h1>",
            f"<p>{'<br>'.join(facts)}</p>",
            "<p>Captions: photo and cosine distance to the centroid; a dashed frame marks an object outside the core.</p>"]
    for title, crops in ((f"Nearest the centroid ({len(cluster['nearest'])})", cluster["nearest"]),
                         (random_title, cluster["random"])):
        body.append(f"<h2>{title}</h2>")
        body.append(f'<div class="grid">{"".join(_crop_figure(c, "../") for c in crops)}</div>' if crops
                    else "<p>none</p>")
    return _page(f"{cluster['name']} - objseg report", "\n".join(body))


def index_page(data: dict) -> str:
    sections = [("clusters", "Clusters"), ("labels", "Against the labels"), ("evaluation", "Evaluation"),
                ("training", "Training"), ("samples", "Sample images"), ("run", "Run")]
    body = ["<h1>objseg report</h1>",
            f"<p>{data['images']} images in <code>{escape(data['images_folder'])}</code>, {data['objects']} objects, "
            f"{data['k']} clusters; workdir <code>{escape(data['workdir'])}</code>; made {escape(data['created'])}.</p>",
            f"<p>Showing the chosen clusters {', '.join(map(str, data['selection']))} only.</p>" if data["selection"] else "",
            "<nav>" + "".join(f'<a href="#{anchor}">{title}</a>' for anchor, title in sections) + "</nav>",
            _clusters_section(data), _labels_section(data), _evaluation_section(data), _training_section(data),
            _samples_section(data), _run_section(data)]
    return _page("objseg report", "\n".join(body))


def _clusters_section(data: dict) -> str:
    labelled = data["against_labels"] is not None
    head = "<tr><th></th><th>id</th><th>name</th><th>objects</th><th>core</th>"
    head += "<th>matched class</th><th>purity</th>" if labelled else ""
    head += "<th>nearest the centroid</th></tr>"
    rows = []
    for c in data["clusters"]:
        preview = "".join(_img(x["file"], x["image"]) for x in c["nearest"][:PREVIEW] if x["file"])
        cells = [_swatch(c["class_value"]), str(c["id"]), f'<a href="clusters/{c["id"]}.html">{escape(c["name"])}</a>',
                 f'<span class="num">{c["objects"]}</span>', f'<span class="num">{c["core"]}</span>']
        if labelled:
            cells += [_class(c.get("matched_class"), data),
                      f"{_percent(c.get('purity'))} {_class(c.get('majority_class'), data)}"]
        cells.append(f'<a class="preview" href="clusters/{c["id"]}.html">{preview or "no crops"}</a>')
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    names_hint = ("" if any(c["named"] for c in data["clusters"]) else
                  "<p>Name clusters in a <code>names.yaml</code> (<code>3: person</code>, one line per cluster id) and pass "
                  "it with <code>--names</code> to <code>report</code> and <code>export</code>; one name for two ids "
                  "merges them into one class, the name <code>ignore</code> drops a cluster.</p>")
    purity = ("<p>Matched class: Hungarian matching over the dataset; purity: the share of the cluster's labelled pixels "
              "in its most frequent class (named after the share).</p>" if labelled else "")
    return (f'<h2 id="clusters">Clusters</h2>{_legend(data)}{names_hint}'
            f'{_img("plots/cluster_sizes.png", "objects per cluster")}'
            f"{purity}<table>{head}{''.join(rows)}</table>")


def _labels_section(data: dict) -> str:
    result = data["against_labels"]
    if result is None:
        return ('<h2 id="labels">Against the labels</h2><p>No labels given: run <code>report --labels LABELDIR</code> '
                "for matched classes, purity, the confusion matrix and per-class IoU.</p>")
    hungarian = result["hungarian"]
    lines = [f"pseudo masks on {result['images']} labelled images, {result['classes']} classes: "
             f"mIoU {hungarian['miou']:.3f}, pixel accuracy {hungarian['pixel_accuracy']:.3f} (Hungarian); "
             f"{_percent(result['ignored_prediction_fraction'])} of labelled pixels are ignore in the pseudo masks"]
    if "majority" in result:
        lines.append(f"majority voting (over-clustering): mIoU {result['majority']['miou']:.3f}")
    return (f'<h2 id="labels">Against the labels</h2><p>{"<br>".join(lines)}</p>'
            "<h3>Confusion after Hungarian matching</h3><p>Each row is a ground-truth class, split over the predicted ids "
            "(pseudo-mask values) its pixels got; matched ids come first, in the order of their class.</p>"
            f'<p>{_img("plots/confusion.png", "confusion matrix after Hungarian matching")}</p>'
            f'<p>{_img("plots/class_iou.png", "per-class IoU")}</p>')


def _evaluation_section(data: dict) -> str:
    if not data["evaluations"]:
        return ('<h2 id="evaluation">Evaluation</h2><p>No <code>evaluate</code> results in this workdir '
                "(<code>run_pipeline.py evaluate --labels LABELDIR [--source segmenter]</code>).</p>")
    rows = "".join(
        f"<tr><td>{escape(e['source'])}</td><td class=num>{_number(e['miou'])}</td><td class=num>{_number(e['majority_miou'])}</td>"
        f"<td class=num>{_number(e['pixel_accuracy'])}</td><td class=num>{_number(e['saliency_iou'])}</td>"
        f"<td class=num>{e['images'] or ''}{_unlabelled(e)}</td>"
        f"<td>{escape(Path(e['labels']).name) if e.get('labels') else ''}</td>"
        f"<td>{'last run' if e['current'] else '<span class=stale>an earlier run</span>'}"
        "</td></tr>" for e in data["evaluations"])
    return ('<h2 id="evaluation">Evaluation</h2><p>From <code>evaluation/*/metrics.json</code>.</p><table><tr><th>source</th>'
            "<th>mIoU</th><th>majority mIoU</th><th>pixel acc.</th><th>saliency fg IoU</th><th>images</th><th>labels</th>"
            "<th>of</th></tr>"
            f"{rows}</table>")


def _unlabelled(evaluation: dict) -> str:
    return f" ({evaluation['without_label']} without a label)" if evaluation.get("without_label") else ""


def _training_section(data: dict) -> str:
    if not data["training"]:
        return '<h2 id="training">Training</h2><p>The segmenter has not been trained in this run.</p>'
    return f'<h2 id="training">Training</h2><p>{_img("plots/training.png", "training curves")}</p>'


def _samples_section(data: dict) -> str:
    columns = [("photo", "photo"), ("saliency", "saliency"), ("pseudo_mask", "pseudo mask")]
    if data["training"]:
        columns.append(("segmenter", "segmenter"))
    if data["against_labels"] is not None:
        columns.append(("ground_truth", "ground truth"))
    rows = []
    for row in data["overlays"]:
        cells = "".join(f"<td>{_img(row[key], title + ' of ' + row['image'], width=row['width'], height=row['height'])}</td>"
                        if row.get(key) else '<td><span class="missing">none</span></td>' for key, title in columns)
        rows.append(f"<tr><th>{escape(row['image'])}</th>{cells}</tr>")
    head = "<tr><th>image</th>" + "".join(f"<th>{title}</th>" for _, title in columns) + "</tr>"
    truth = "; the ground truth uses the same palette by class id (VOC's colours)" if data["against_labels"] else ""
    return (f'<h2 id="samples">Sample images ({len(data["overlays"])} of {data["images"]})</h2>{_legend(data)}'
            f"<p>Saliency: white is foreground. Pseudo masks and segmenter in the class colours above{truth}.</p>"
            f'<table class="panels">{head}{"".join(rows)}</table>')


def _run_section(data: dict) -> str:
    stages = "".join(
        f"<tr><td>{escape(s['stage'])}</td><td><code>{escape(s['key'])}</code></td>"
        f"<td class=num>{_number(s['seconds'], 1)}</td><td>{escape(str(s['finished'] or ''))}</td>"
        f"<td>{escape(', '.join(f'{k}={v}' for k, v in s['counts'].items()))}</td><td class=num>{s['skipped']}</td></tr>"
        for s in data["stages"])
    skipped = data["skipped"]
    skipped_rows = "".join(f"<tr><td>{escape(s['stage'])}</td><td class=wrap>{escape(s['image'])}</td><td>{escape(s['reason'])}</td></tr>"
                           for s in skipped[:MAX_SKIPPED_ROWS])
    more = f"<p>and {len(skipped) - MAX_SKIPPED_ROWS} more (see the stages' manifest.json)</p>" if len(skipped) > MAX_SKIPPED_ROWS else ""
    skipped_html = (f"<table><tr><th>stage</th><th>image</th><th>reason</th></tr>{skipped_rows}</table>{more}"
                    if skipped else "<p>No file was skipped.</p>")
    names = (f"<h3>Cluster names</h3><pre>{escape(json.dumps(data['names'], indent=1))}</pre>" if data["names"] else "")
    return ('<h2 id="run">Run</h2><table><tr><th>stage</th><th>artifact key</th><th>seconds</th><th>finished</th>'
            f"<th>counts</th><th>skipped</th></tr>{stages}</table><h3>Skipped files</h3>{skipped_html}{names}"
            f"<h3>Config</h3><pre>{escape(yaml.safe_dump(data['config'], sort_keys=False))}</pre>")

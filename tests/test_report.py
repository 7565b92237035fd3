"""The HTML report of a finished run, cluster names, the run log, and the report in a real browser."""
from __future__ import annotations

import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

import run_pipeline
from pipeline import runner
from commands.demo import make_shapes
from pipeline.errors import InputError
from pipeline.names import check_clusters, load_names, parse_clusters
from commands.report import NEAREST, report_workdir
from tests.conftest import quiet, tiny_config

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("src", "href")]


def _links(page: Path) -> list[str]:
    parser = _Links()
    parser.feed(page.read_text())
    return parser.links


def _names(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "names.yaml"
    path.write_text(text)
    return path


def test_report_shows_clusters_names_labels_and_the_run(finished_run, tmp_path):
    workdir, labels, keys = finished_run
    names = _names(tmp_path, "0: discs\n2: <b>rings</b> & co\n")
    index = report_workdir(workdir, tmp_path / "report", labels, names)
    report = index.parent
    data = json.loads((report / "report.json").read_text())
    clusters = data["clusters"]
    assert [c["name"] for c in clusters] == ["discs", "cluster_1", "<b>rings</b> & co"]
    assert data["names"] == {"0": "discs", "2": "<b>rings</b> & co"}
    manifest = json.loads((workdir / "cache" / "cluster" / keys["cluster"] / "manifest.json").read_text())
    assert [c["objects"] for c in clusters] == manifest["counts"]["cluster_sizes"]
    assert sum(c["core"] for c in clusters) == manifest["counts"]["core_objects"]
    for cluster in clusters:
        distances = [x["distance"] for x in cluster["nearest"]]
        assert distances == sorted(distances) and len(distances) == min(NEAREST, cluster["objects"])
        assert len(cluster["nearest"]) + len(cluster["random"]) == cluster["objects"]  # tiny clusters: every object shown
        assert 0 < cluster["purity"] <= 1 and cluster["majority_class"] in range(5)
    matched = [c["matched_class"] for c in clusters if c["matched_class"] is not None]
    assert len(set(matched)) == len(matched)  # Hungarian: one class per id
    assert data["against_labels"]["hungarian"]["miou"] > 0 and data["training"]
    assert [s["stage"] for s in data["stages"]] == list(keys)
    assert {"photo", "saliency", "pseudo_mask", "segmenter", "ground_truth"} <= set(data["overlays"][0])
    for plot in ("cluster_sizes", "confusion", "class_iou", "training"):
        assert (report / "plots" / f"{plot}.png").stat().st_size > 0
    pages = [index, *(report / "clusters" / f"{c['id']}.html" for c in clusters)]
    for page in pages:  # every link is relative and its file is in the report
        for link in _links(page):
            target = (page.parent / link.split("#")[0]).resolve()
            assert "://" not in link and target.is_relative_to(report.resolve()) and target.exists(), (page, link)
    html = index.read_text()
    assert "discs" in html and "&lt;b&gt;rings&lt;/b&gt; &amp; co" in html and "<b>rings" not in html
    assert "<script" not in html and "discs" in (report / "clusters" / "0.html").read_text()
    for key in keys.values():
        assert key in html


def test_report_without_labels_lists_skipped_files_and_replaces_an_earlier_report(finished_run, tmp_path):
    workdir = finished_run[0]
    out = tmp_path / "report"
    report_workdir(workdir, out)
    assert "broken&lt;1&gt;.jpg</td><td>empty file (0 bytes)" in (out / "index.html").read_text()
    report_workdir(workdir, out)
    data = json.loads((out / "report.json").read_text())
    assert data["against_labels"] is None and "purity" not in data["clusters"][0]
    assert not (out / "plots" / "confusion.png").exists()  # the first report's own file, replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary or old folder left
    (out / "src").mkdir()
    (out / "src" / "code.py").write_text("a user's file in the report folder")
    with pytest.raises(InputError, match=r"not an earlier report.*src/code.py"):
        report_workdir(workdir, out)
    assert (out / "src" / "code.py").is_file() and (out / "index.html").is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not an earlier report"):
        report_workdir(workdir, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("text, error", [
    ("- discs\n- rings\n", "must map cluster ids to names"),
    ("7: discs\n", "7 is not a cluster of this run"),
    ("0: 5\n", "name of cluster 0 must be a non-empty string"),
    ("0: discs\n'0': rings\n", "cluster 0 is named twice"),
    ("true: discs\n", "True is not a cluster id"),
    ("0: [discs\n", "not valid YAML"),
])
def test_bad_names_files_are_errors_naming_the_file(tmp_path, text, error):
    with pytest.raises(InputError, match=f"names.yaml.*{error}"):
        load_names(_names(tmp_path, text), k=3)


def test_names_and_cluster_choices():
    assert parse_clusters("2, 0,2") == [2, 0, 2] and check_clusters([2, 0, 2], 3) == [0, 2]
    with pytest.raises(InputError, match="e.g. 3,7"):
        parse_clusters("2,x")
    with pytest.raises(InputError, match="--clusters: 3 is not a cluster"):
        check_clusters([3], 3)


def test_cli_report_and_a_log_file_per_invocation(finished_run, tmp_path, capsys):
    workdir = Path(shutil.copytree(finished_run[0], tmp_path / "wd"))
    assert run_pipeline.main(["report", "--workdir", str(workdir), "--labels", str(finished_run[1])]) == 0
    assert (workdir / "report" / "index.html").is_file()
    assert run_pipeline.main(["export", "--workdir", str(workdir), "--to", str(tmp_path / "out"), "--clusters", "9"]) == 2
    assert "--clusters: 9 is not a cluster" in capsys.readouterr().err
    [report_log], [export_log] = (workdir / "logs").glob("*-report.log"), (workdir / "logs").glob("*-export.log")
    text = report_log.read_text()
    assert text.startswith(f"$ run_pipeline.py report --workdir {workdir}") and "report written" in text and "exit code 0" in text
    assert "--clusters: 9 is not a cluster" in export_log.read_text() and "exit code 2" in export_log.read_text()
    assert run_pipeline.main(["status", "--workdir", str(tmp_path / "typo")]) == 2
    assert not (tmp_path / "typo").exists()  # no log folder made for a workdir that is not there


def _browser():
    """Playwright driving Debian's chromium, or a skip saying what is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs `pip install playwright`")
    if not CHROMIUM.is_file():
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium)")
    return sync_api.sync_playwright


LONG_NAME = "a_rather_long_photo_name_from_a_camera_2024-06-01_12-00-00_IMG_1234"


def _laptop_sized_report(tmp_path: Path) -> Path:
    """The report of a tiny run on photos of 320x240 (full-size sample panels, all five columns), one with a
    long name and an unreadable file with a long name, so every page is as wide as a real report's."""
    images, labels = make_shapes(tmp_path / "wide", 4, size=(320, 240))
    (images / "shape_0001.jpg").rename(images / f"{LONG_NAME}.jpg")
    (labels / "shape_0001.png").rename(labels / f"{LONG_NAME}.png")
    (images / f"{LONG_NAME}_unreadable.jpg").write_bytes(b"")
    runner.run(tiny_config(), images, tmp_path / "wd", log=quiet)
    return report_workdir(tmp_path / "wd", tmp_path / "report", labels).parent


def test_report_renders_in_a_browser_without_broken_images_or_errors(tmp_path):
    """Every page fits a 1280-pixel-wide window (a laptop's), shows all its images and logs no error.
    Set OBJSEG_REPORT=WD/report to check an existing report, OBJSEG_SCREENSHOTS=DIR to keep the screenshots."""
    sync_playwright = _browser()
    if os.environ.get("OBJSEG_REPORT"):
        report = Path(os.environ["OBJSEG_REPORT"]).resolve()
    else:  # the run is made only now, not when the test is skipped or checks a given report
        report = _laptop_sized_report(tmp_path)
    shots = Path(os.environ.get("OBJSEG_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    clusters = sorted(report.glob("clusters/*.html"), key=lambda p: int(p.stem))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            pages = [(report / "index.html", "index.png"), (clusters[0], "cluster.png"), *((c, None) for c in clusters[1:])]
            for html, shot in pages:
                page.goto(html.as_uri(), wait_until="load")
                images = page.evaluate("[...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
                broken = [src for src, complete, width in images if not complete or width == 0]
                assert images and not broken, f"{html}: broken images {broken[:5]}"
                width = page.evaluate("document.documentElement.scrollWidth")
                assert width <= 1280, f"{html} is {width} px wide: wider than a 1280-px window"
                if shot:
                    page.screenshot(path=str(shots / shot), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
    assert all((shots / s).stat().st_size > 0 for s in ("index.png", "cluster.png"))


def test_chosen_clusters_and_names_round_trip_into_the_report_from_the_cli(finished_run, tmp_path):
    workdir = finished_run[0]
    names = _names(tmp_path, "0: discs\n2: rings\n")
    out = tmp_path / "chosen"
    assert run_pipeline.main(["report", "--workdir", str(workdir), "--out", str(out), "--names", str(names),
                              "--clusters", "2,0"]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["selection"] == [0, 2] and [c["id"] for c in data["clusters"]] == [0, 2]
    assert [c["name"] for c in data["clusters"]] == ["discs", "rings"]
    assert sorted(p.name for p in (out / "clusters").iterdir()) == ["0.html", "2.html"]
    assert "Showing the chosen clusters 0, 2 only" in (out / "index.html").read_text()
    assert run_pipeline.main(["report", "--workdir", str(workdir), "--out", str(out), "--clusters", "9"]) == 2

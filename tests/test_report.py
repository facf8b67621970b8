"""``soundstage report``: the page is written, loads in a real headless Chromium and every image on
it is displayed; its scores are those ``soundstage evaluate --run`` gives."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from click.testing import CliRunner
from fixtures_synth import synth_dir  # noqa: F401
from fixtures_trained import trained_run  # noqa: F401

from soundstage.cli import main
from soundstage.train.run_dir import RunDir

FIXED_PICTURES = {"curves.png", "tags.png", "clusters.png"}
SECTIONS = ("best", "worst", "audio-sensitive")


def _browser_paths():
    binary = next(filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))), None)
    return binary, shutil.which("chromedriver")


def _assert_displayed_in_chromium(page: str, sources: set, title: str, screenshot) -> None:
    """The page loads in headless Chromium, titled ``title``, and every one of its images is displayed."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver = _browser_paths()
    options = Options()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1300,5000",
        "--allow-file-access-from-files",
    ):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=Service(driver))
    try:
        browser.get("file://" + page)
        assert browser.execute_script("return document.readyState") == "complete"
        assert title in browser.title
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth, "
            "i.getBoundingClientRect().width])"
        )
        assert {src for src, *_ in images} == sources
        not_shown = [src for src, complete, natural, shown in images if not (complete and natural > 0 and shown > 0)]
        assert not not_shown, f"images not displayed: {not_shown}"
        assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    finally:
        browser.quit()


def _tag_and_unit_caches(manifest: str, cache: str, models: str) -> None:
    """beats, hubert, kmeans and units outputs of the tiny models, for the histograms."""
    from soundstage.models.tiny import build_tiny_models
    from soundstage.pipeline.runner import run_stage
    from soundstage.stages import get_stage

    paths = build_tiny_models(models, names=["beats", "hubert"])
    quiet = {"progress": False, "log": lambda *_: None}
    for stage, params in (
        ("beats", {"checkpoint": paths["beats"], "device": "cpu"}),
        ("hubert", {"model": paths["hubert"], "layer": 2, "device": "cpu"}),
        ("kmeans", {"k": 8, "percent": 1.0}),
        ("units", {"top_k": 3}),
    ):
        assert run_stage(get_stage(stage), manifest, cache, params, **quiet).ok


def test_report_renders_in_headless_chromium_with_every_image_loaded(trained_run, tmp_path):
    binary, driver = _browser_paths()
    if not binary or not driver:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium chromium-driver, as .ci/run does)")
    from soundstage.train.run_eval import evaluate_saved_run

    cache = str(tmp_path / "cache")
    _tag_and_unit_caches(trained_run["manifest"], cache, str(tmp_path / "models"))
    out = tmp_path / "report"
    result = CliRunner().invoke(
        main, ["report", "--run", trained_run["run"], "--out", str(out), "--cache", cache, "--device", "cpu", "--split", "train"]
    )
    assert result.exit_code == 0, result.output
    page = str(out / "index.html")
    assert f"report: {page}" in result.output
    text = open(page, encoding="utf-8").read()
    sources = set(re.findall(r'<img src="([^"]+)"', text))
    scores = json.load(open(out / "scores.json", encoding="utf-8"))
    shown = scores["shown"]
    # the chosen split (6 train clips): best and worst, no clip twice (none left for audio-sensitive);
    # each clip with its frames and the spectrogram strip of its audio
    assert scores["split"] == "train" and len(scores["clip_iou"]["real"]) == 6
    assert scores["weights"] == RunDir(trained_run["run"]).weights()[0]  # best when the run keeps one
    assert sum(len(shown[s]) for s in SECTIONS) == len({c for s in SECTIONS for c in shown[s]}) == 6
    strips = {f"clips/{s}-{n}-{kind}.png" for s in SECTIONS for n in range(1, len(shown[s]) + 1) for kind in ("real", "audio")}
    strips |= {f"clips/audio-sensitive-{n}-muted.png" for n in range(1, len(shown["audio-sensitive"]) + 1)}
    assert sources == FIXED_PICTURES | strips
    assert all(os.path.getsize(out / name) > 0 for name in sources)
    for section in SECTIONS:  # every shown clip is labelled in plain text: id, subset, sounding classes, IoU
        for clip in shown[section]:
            label = re.search(rf"<p class=cliplabel>({re.escape(clip)} · [^<]*)</p>", text)
            assert label and "IoU" in label.group(1) and "sounding:" in label.group(1)
    for heading in (
        "Curves",
        "Audio sensitivity",
        "Per subset",
        "Per class",
        "Best clips",
        "Worst clips",
        "Audio-sensitive clips",
        "From the caches",
    ):
        assert f"<h2>{heading}" in text
    for variant in ("real", "muted", "zeroed", "swapped", "noise:10", "real − muted", "real − swapped"):
        assert f"<tr><td>{variant}</td>" in text

    # the scores on the page are those of `soundstage evaluate --run` (another code path)
    for audio in ("real", "muted"):
        evaluated = evaluate_saved_run(
            trained_run["run"], split="train", audio=audio, protocol="avsbench-binary", device="cpu", log=lambda *_: None
        )
        assert scores["protocols"][audio]["avsbench-binary"]["miou"] == pytest.approx(evaluated["miou"], abs=1e-6)
        assert scores["protocols"][audio]["avsbench-binary"]["fscore"] == pytest.approx(evaluated["fscore"], abs=1e-6)

    _assert_displayed_in_chromium(page, sources, "soundstage report", tmp_path / "report-screenshot.png")


def test_comparison_page_of_two_runs_renders_in_headless_chromium(trained_run, tmp_path):
    """``report --run A --run B``: settings that differ, overlaid curves, every protocol, audio
    sensitivity per run and the same clips' frames from each run, with the numbers of each run's
    own evaluation."""
    binary, driver = _browser_paths()
    if not binary or not driver:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium chromium-driver, as .ci/run does)")
    from fixtures_trained import train_tiny

    from soundstage.train.run_eval import evaluate_saved_run

    other = train_tiny(trained_run["manifest"], trained_run["cache"], str(tmp_path / "runs" / "other"), lr=3e-4, seed=1)
    out = tmp_path / "compare"
    result = CliRunner().invoke(
        main, ["report", "--run", trained_run["run"], "--run", other, "--out", str(out), "--device", "cpu", "--weights", "last"]
    )
    assert result.exit_code == 0, result.output
    page = str(out / "index.html")
    text = open(page, encoding="utf-8").read()
    scores = json.load(open(out / "scores.json", encoding="utf-8"))
    assert list(scores["runs"]) == ["stage1", "other"]
    assert scores["settings_differ"] == ["lr", "seed"]
    for heading in ("Runs", "Settings that differ", "Curves", "Metrics", "Audio sensitivity", "The same clips from each run"):
        assert f"<h2>{heading}" in text
    for protocol in ("avsbench-binary", "bias-in-avs", "stepping-stones", "segpref"):
        assert f"<th>{protocol} mIoU</th>" in text
    for name, path in (("stage1", trained_run["run"]), ("other", other)):
        evaluated = evaluate_saved_run(
            path, audio="real", protocol="avsbench-binary", device="cpu", log=lambda *_: None, weights="last"
        )
        assert scores["runs"][name]["weights"] == RunDir(path).weights("last")[0]
        assert scores["runs"][name]["protocols"]["real"]["avsbench-binary"]["miou"] == pytest.approx(evaluated["miou"], abs=1e-6)
    # the same frames of the same clips, one strip per run, and the clip's spectrogram under them
    shown = scores["shown"]
    assert shown and len(shown) <= 4
    strips = {f"clips/compare-{n}-{kind}.png" for n in range(1, len(shown) + 1) for kind in ("run1", "run2", "audio")}
    sources = set(re.findall(r'<img src="([^"]+)"', text))
    assert sources == {"curves.png"} | strips
    _assert_displayed_in_chromium(page, sources, "soundstage run comparison", tmp_path / "compare-screenshot.png")
    # the histogram options belong to the page of one run
    refused = CliRunner().invoke(main, ["report", "--run", trained_run["run"], "--run", other, "--out", str(out), "--beats", "x"])
    assert refused.exit_code == 2 and "--beats" in refused.output


def test_demo_ends_with_the_runs_masks_and_report(trained_run, tmp_path):
    """The demo's last step (after training): the run's stage-1 masks for every clip, then the
    report page, whose path is printed; a page newer than the finished run is kept as it is."""
    from soundstage.cache import open_stage
    from soundstage.demo import masks_and_report
    from soundstage.manifests.table import read_manifest

    cache, report_dir = str(tmp_path / "cache"), tmp_path / "report"
    report_dir.mkdir()
    page = report_dir / "index.html"
    page.write_text("<html>an earlier report of this run</html>")
    said = []
    assert masks_and_report(cache, trained_run["manifest"], trained_run["run"], str(report_dir), out=said.append) == str(page)
    assert page.read_text() == "<html>an earlier report of this run</html>"
    (output,) = os.listdir(os.path.join(cache, "masks"))
    clips = set(read_manifest(trained_run["manifest"])["clip_id"])
    assert set(open_stage(os.path.join(cache, "masks", output))) == clips
    assert any(output in line for line in said) and any("export masks" in line for line in said)
    # no finished run (e.g. too few clips to train): nothing, and it says so
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    assert masks_and_report(cache, trained_run["manifest"], str(unfinished), str(report_dir), out=said.append) is None
    assert "skipped" in said[-1]

"""report.html: self-contained (inline CSS, PNGs as data URIs, nothing fetched), every section fed from the run
directory's files, a note for each missing input, and it renders with its images in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lora_dpo import plots
from lora_dpo.report import build_html, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(html: str) -> list[tuple[str, dict]]:
    p = _Tags()
    p.feed(html)
    return p.tags


def _metrics(steps: int = 10) -> list[dict]:
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, "loss": 0.7 - 0.03 * s, "rewards/chosen": 0.01 * s, "rewards/rejected": -0.02 * s,
               "rewards/margins": 0.03 * s, "rewards/accuracies": min(1.0, 0.5 + 0.05 * s),
               "logps/chosen": -50 + s, "logps/rejected": -50 - s, "learning_rate": 1e-4}
        if s % 5 == 0:
            row.update({"eval/loss": 0.69 - 0.02 * s, "eval/rewards/margins": 0.02 * s,
                        "eval/rewards/accuracies": 0.6, "eval/logps/chosen": -49.0, "eval/logps/rejected": -52.0})
        rows.append(row)
    return rows


@pytest.fixture
def run_dir(tmp_path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    (d / "recipe.yaml").write_text("model:\n  name_or_path: tiny/model\ndpo:\n  loss_type: sigmoid\n  beta: 0.1\n"
                                   "lora:\n  r: 16\n")
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _metrics()) + '{"step": 11, "lo')
    (d / "data_report.json").write_text(json.dumps({
        "train": {"rows": 12, "kept": 11}, "eval": None,
        "lengths": {"prompt": [10, 12, 15, 9], "chosen": [5, 6, 7, 8], "rejected": [4, 6, 6, 9]}}))
    (d / "data_report.txt").write_text("train.jsonl: 12 rows read, 11 pairs kept, 1 dropped\n")
    (d / "eval.json").write_text(json.dumps({
        "data": "eval.jsonl", "pairs": 8,
        "before": {"behaviour_rate": 0.0, "eval/rewards/accuracies": 0.5, "eval/rewards/margins": 0.0},
        "after": {"behaviour_rate": 0.75, "eval/rewards/accuracies": 0.875, "eval/rewards/margins": 1.2345,
                  "eval/logps/chosen": -41.5, "eval/logps/rejected": -60.25},
        "logps": {"policy": {"chosen": -41.5, "rejected": -60.25}, "reference": {"chosen": -44.0, "rejected": -47.0}},
        "kl": {"estimator": "mean of log π_θ(y|x) − log π_ref(y|x)", "kl": 0.4321, "kl_per_token": 0.0123,
               "std_error": 0.05, "samples": 16, "seed": 42},
        "reward_model": {"model": "my/rm", "prompts": 4, "wins": 2, "ties": 1, "losses": 1, "win_rate": 0.5,
                         "tie_rate": 0.25, "mean_score_policy": 1.0, "mean_score_reference": 0.5},
        "generations": [
            {"prompt": "Say <script>alert(1)</script>", "reference": "No & no", "policy": "see http://example.com",
             "score_policy": 1.5, "score_reference": 0.25},
            {"prompt": [{"role": "user", "content": "Hi there"}], "reference": "Hello.", "policy": "Ahoy! Hello.",
             "score_policy": 0.5, "score_reference": 0.5}]}))
    (d / "adapter").mkdir()
    return d


def test_report_is_self_contained_and_shows_every_input(run_dir):
    from PIL import Image

    path = write_report(run_dir)
    assert path == run_dir / "report.html" and not list(run_dir.glob(".*tmp"))
    html = path.read_text()
    tags = _tags(html)
    refs = [v for _, a in tags for k, v in a.items() if k in ("src", "href")]
    assert refs and not any("http" in v for v in refs)  # no URL at all: nothing to fetch offline
    assert not any(t in ("link", "script", "iframe") for t, _ in tags)
    imgs = [a["src"] for t, a in tags if t == "img"]
    # loss, reward margins, accuracy, log-probs, token lengths
    assert len(imgs) == 5 and all(s.startswith("data:image/png;base64,") for s in imgs)
    for src in imgs:
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert im.format == "PNG" and im.width > 200 and im.height > 100
    assert "<style>" in html
    # the numbers come from the files
    assert "0.8750" not in html and "0.875" in html and "1.234" in html  # eval.json, 4 significant digits
    assert "−44" in html.replace("-", "−") and "−60.25" in html.replace("-", "−")  # reference / policy log-probs
    assert "0.4321" in html and "16 sampled answers" in html  # KL
    assert "my/rm" in html and "win rate 0.5" in html and "ties 1" in html  # reward model
    assert "12 rows read, 11 pairs kept, 1 dropped" in html  # data_report.txt
    assert "last logged training step: <b>10</b>" in html  # the half-written 11th line is skipped
    # generations, escaped, message-list prompts rendered
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html
    assert "No &amp; no" in html and "user: Hi there" in html and "Ahoy! Hello." in html
    assert "No final adapter" not in html


def test_each_curve_needs_its_metrics():
    rows = [{k: v for k, v in r.items() if not k.startswith("logps/") and not k.startswith("eval/")}
            for r in _metrics(4)]
    titles = [t for t, _ in plots.curves(rows)]
    assert titles == ["Loss", "Reward margins", "Reward accuracy"]
    assert [t for t, _ in plots.curves(_metrics(4))][-1].startswith("Log-probs")
    assert plots.curves([]) == []


def test_report_without_matplotlib(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails, as when not installed
    assert not plots.available()
    html = build_html(run_dir)
    assert "<img" not in html and "Plots not drawn: matplotlib is not installed" in html
    assert "0.4321" in html and "Ahoy! Hello." in html  # everything else is still there


def test_report_of_a_partial_run(tmp_path):
    d = tmp_path / "partial"
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _metrics(3)))
    html = write_report(d).read_text()
    assert "No final adapter" in html and "No data report" in html and "No held-out evaluation" in html
    assert "No token-length distribution" in html and "No recipe.yaml" in html
    assert html.count("<img") == 4  # loss, margins, accuracy, log-probs; no lengths without a data report


_PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.title = 'images ' + ok + '/' + imgs.length + ' sections ' + document.querySelectorAll('h2').length;
});
</script>"""


def _chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--disable-dev-shm-usage", f"--user-data-dir={user_data}", *args],
                          capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/install installs it)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    from PIL import Image

    html = write_report(run_dir).read_text()
    # a test-only copy with a probe that counts the images the browser actually decoded
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", _PROBE + "</body>"))
    res = _chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri(), user_data=tmp_path / "profile")
    title = re.search(r"<title>(.*?)</title>", res.stdout)
    assert title, res.stderr[-2000:]
    assert title.group(1) == "images 5/5 sections 6"
    # and the report itself, untouched, paints something (not a blank page)
    shot = tmp_path / "shot.png"
    _chromium("--window-size=1200,1600", f"--screenshot={shot}", (run_dir / "report.html").as_uri(),
              user_data=tmp_path / "profile2")
    im = Image.open(shot).convert("RGB")
    assert im.size == (1200, 1600) and len(im.getcolors(maxcolors=1 << 20) or []) > 50


def test_an_interrupted_run_writes_its_report(recipe_dict, monkeypatch):
    """A run stopped by a signal (here: the stop already requested when the loop starts) still leaves report.html
    with the curves so far."""
    from lora_dpo import train
    from lora_dpo.errors import TrainingStopped
    from lora_dpo.recipe import recipe_from_dict

    train_mod = sys.modules["lora_dpo.train"]

    class StopAtOnce(train_mod._StopSignal):
        def __enter__(self):
            super().__enter__()
            self.requested = "SIGTERM"
            return self

    monkeypatch.setattr(train_mod, "_StopSignal", StopAtOnce)
    recipe_dict["train"].update(max_steps=4, logging_steps=1)
    with pytest.raises(TrainingStopped, match=r"stopped by SIGTERM at step 1/4; checkpoint .*step-00000001") as e:
        train(recipe_from_dict(recipe_dict))  # an interrupt, so a script or a sweep loop stops too
    run = e.value.result
    assert run.stopped == "SIGTERM" and run.steps == 1 and not (run.output_dir / "adapter").exists()
    assert (run.adapter_dir / "adapter_model.safetensors").is_file()  # the checkpoint's adapter
    html = (run.output_dir / "report.html").read_text()
    assert "No final adapter" in html and "last logged training step: <b>1</b>" in html and "<img" in html

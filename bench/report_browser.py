"""Render an evaluation's report.html in a real headless browser and check what it shows.

    python bench/report_browser.py runs/default/eval            # -> runs/default/eval/report-screenshot.png
    python bench/report_browser.py runs/default/eval --browser /usr/bin/chromium --width 1280

The test suite checks report.html with the standard library's parser (tables equal summary.json,
every image an embedded PNG that decodes); this script is the check that a browser lays it out:
Chromium (Debian's package `chromium`; `apt-get install chromium`) opens the file offline with
networking off, dumps the DOM it parsed and takes a screenshot of the whole page. It fails (exit 1,
one line) when the browser is missing or fails, when the parsed DOM lacks a table or an image of
the report, or when the screenshot has fewer painted image rows than the report has images. The
screenshot is written beside the report (or to --out) for a person to look at.
"""

from __future__ import annotations

import argparse
import html.parser
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.files import atomic_path  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


class _Census(html.parser.HTMLParser):
    """Table ids and image count of a page."""

    def __init__(self):
        super().__init__()
        self.tables: list[str] = []
        self.images = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append(attrs.get("id", ""))
        elif tag == "img" and (attrs.get("src") or "").startswith("data:image/png;base64,"):
            self.images += 1


def census(text: str) -> _Census:
    c = _Census()
    c.feed(text)
    return c


def find_browser(given: str | None) -> str:
    if given:
        if shutil.which(given) is None:
            raise SystemExit(f"error: browser {given} not found")
        return given
    for name in BROWSERS:
        if shutil.which(name):
            return name
    raise SystemExit("error: no headless browser found (install Debian's chromium: apt-get install chromium)")


def chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """One headless run, offline (no proxy, no network service reachable), a throwaway profile."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", f"--user-data-dir={profile}",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def painted_blocks(png: Path) -> tuple[int, int]:
    """(page height in px without the white tail, number of vertical runs of >= 100 rows where
    more than 20% of the row is not white: the embedded figures and the tables' shading)."""
    gray = np.asarray(Image.open(png).convert("L"))
    ink = (gray < 245).mean(axis=1)
    rows = np.flatnonzero(ink > 0)
    height = int(rows[-1]) + 1 if rows.size else 0
    edges = np.flatnonzero(np.diff(np.concatenate([[0], (ink > 0.2).astype(int), [0]])))
    runs = edges[1::2] - edges[::2]
    return height, int((runs >= 100).sum())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("eval_dir", type=Path, help="an `evaluate` output folder (holds report.html)")
    p.add_argument("--out", type=Path, help="screenshot PNG (default: <eval_dir>/report-screenshot.png)")
    p.add_argument("--browser", help=f"browser executable (default: the first of {', '.join(BROWSERS)} on PATH)")
    p.add_argument("--width", type=int, default=1280, help="window width, px (default 1280)")
    args = p.parse_args(argv)

    report = args.eval_dir / "report.html"
    if not report.is_file():
        print(f"error: {report} does not exist (run `python -m trainer evaluate` first)", file=sys.stderr)
        return 1
    browser = find_browser(args.browser)
    want = census(report.read_text(encoding="utf-8"))
    out = args.out or args.eval_dir / "report-screenshot.png"
    url = report.resolve().as_uri()
    with tempfile.TemporaryDirectory() as tmp:
        dom = chromium(browser, Path(tmp) / "profile", "--dump-dom", url)
        if dom.returncode != 0 or "<body" not in dom.stdout:
            print(f"error: {browser} --dump-dom failed (exit {dom.returncode}): {dom.stderr.strip()[-300:]}",
                  file=sys.stderr)
            return 1
        got = census(dom.stdout)
        # windows of growing height, until the page ends inside one: that screenshot is the page
        shot = Path(tmp) / "shot.png"
        for height in (6000, 12000, 24000, 48000):
            run = chromium(browser, Path(tmp) / "profile", f"--window-size={args.width},{height}",
                           f"--screenshot={shot}", url)
            if run.returncode != 0 or not shot.is_file():
                print(f"error: {browser} --screenshot failed (exit {run.returncode}): {run.stderr.strip()[-300:]}",
                      file=sys.stderr)
                return 1
            painted, blocks = painted_blocks(shot)
            if painted < height - 40:
                break
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp_out:
            Image.open(shot).crop((0, 0, args.width, painted + 20)).save(tmp_out, format="PNG")
    problems = []
    if got.tables != want.tables:
        problems.append(f"the browser's DOM has tables {got.tables}, report.html {want.tables}")
    if got.images != want.images:
        problems.append(f"the browser's DOM has {got.images} embedded images, report.html {want.images}")
    if blocks < want.images:
        problems.append(f"the screenshot shows {blocks} painted blocks, fewer than the {want.images} images")
    print(f"{browser}: {len(got.tables)} tables, {got.images} embedded images; screenshot {args.width}×{painted} px, "
          f"{blocks} painted blocks -> {out}")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A screenshot of a notebook page of the built site, taken with a headless Chromium, and checked
for the notebook's figure.

The page is opened from the site's folder (``file://``, nothing served): a copy of it beside it
carries a script that scrolls the page's first figure (an ``<img>`` of a PNG the notebook made)
into view and reports whether it loaded (``naturalWidth > 0``), its size and where it lies in the
viewport. Chromium's own ``--headless --dump-dom`` reads that report and ``--screenshot`` takes
the picture, so nothing but the browser is needed (no Playwright, no browser download). The check
then finds the figure in the screenshot: the region the report names is within the viewport, is
not blank, and matches the figure's PNG pixel for pixel within a small tolerance.

    python scripts/notebooks.py OUT --site SITE       # the site, notebooks executed
    python scripts/screenshot_docs.py SITE shot.png   # notebooks/01_quickstart/ by default
    python scripts/screenshot_docs.py SITE shot.png --page notebooks/05_transformer

Chromium: ``--chromium PATH``, or the first of chromium, chromium-browser, google-chrome on PATH
(Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WINDOW = (1280, 900)
TOLERANCE = 8.0  # mean absolute difference (0-255) between the figure and its screenshot
REPORT = "fxtrain-figure:"
CHECK = """<script>
window.addEventListener("load", () => {
  const img = document.querySelector('article img[src^="data:image/png"]');
  if (!img) { document.title = "%(report)s" + JSON.stringify({found: false}); return; }
  const r = img.getBoundingClientRect();
  document.title = "%(report)s" + JSON.stringify({
    found: true, complete: img.complete, naturalWidth: img.naturalWidth,
    naturalHeight: img.naturalHeight, left: r.left, top: r.top, width: r.width,
    height: r.height, viewWidth: window.innerWidth, pageHeight: document.body.scrollHeight,
    src: img.src.slice("data:image/png;base64,".length)});
});
</script>
""" % {"report": REPORT}


def find_chromium() -> str | None:
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def _chromium(browser: str, profile: Path, height: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--force-device-scale-factor=1", f"--window-size={WINDOW[0]},{height}",
         "--virtual-time-budget=5000", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120, check=False)


def _report(dom: str) -> dict:
    title = re.search(r"<title>" + re.escape(REPORT) + r"(.*?)</title>", dom, re.S)
    if title is None:
        raise RuntimeError("the page's check did not run (no report in its title)")
    return json.loads(title.group(1).replace("&amp;", "&").replace("&quot;", '"'))


def check(report: dict, screenshot: np.ndarray) -> float:
    """How far the figure's region of the screenshot is from the PNG the page embeds (the mean
    absolute difference, 0-255), after checking the figure loaded, lies within the window and
    is not blank; a RuntimeError saying what is wrong otherwise."""
    if not report["complete"] or report["naturalWidth"] == 0:
        raise RuntimeError(f"the figure did not load: {report}")
    left, top = round(report["left"]), round(report["top"])
    width, height = round(report["width"]), round(report["height"])
    if left < 0 or top < 0 or left + width > screenshot.shape[1] \
            or top + height > screenshot.shape[0]:
        raise RuntimeError(f"the figure ({left}, {top}, {width}x{height}) is not within the "
                           f"screenshot ({screenshot.shape[1]}x{screenshot.shape[0]})")
    region = screenshot[top:top + height, left:left + width, :3].astype(np.float64)
    if region.std() < 10:
        raise RuntimeError(f"the figure's region of the screenshot is blank "
                           f"(std {region.std():.1f})")
    png = Image.open(io.BytesIO(base64.b64decode(report["src"]))).convert("RGB")
    if png.size != (width, height):  # shown scaled: compare at the size it is shown
        png = png.resize((width, height), Image.BILINEAR)
    difference = np.abs(np.asarray(png, dtype=np.float64) - region).mean()
    if difference > TOLERANCE:
        raise RuntimeError(f"the screenshot's region differs from the figure by {difference:.1f} "
                           f"(mean of 0-255 over pixels; at most {TOLERANCE})")
    return float(difference)


def screenshot(site: Path, page: str, out: Path, browser: str) -> dict:
    """Screenshots ``site/page/index.html`` into ``out`` (the window's height down to the
    figure) and checks its first figure; returns the page's report (without the PNG) and the
    figure's difference from its screenshot."""
    html = site / page / "index.html"
    if not html.exists():
        raise FileNotFoundError(f"no page {html}; build the site with scripts/notebooks.py")
    text = html.read_text("utf-8")
    copy = html.with_name("screenshot-check.html")  # beside it: its relative links still work
    copy.write_text(text.replace("</body>", CHECK + "</body>"), "utf-8")
    try:
        with tempfile.TemporaryDirectory(prefix="fxtrain-chromium-") as profile:
            dom = _chromium(browser, Path(profile), WINDOW[1], "--dump-dom", copy.as_uri())
            report = _report(dom.stdout)
            if not report["found"]:
                raise RuntimeError("the page has no <img> of a PNG figure in its article")
            # a window tall enough to hold the figure where it lies: headless Chromium paints
            # nothing of a page scrolled down (the figure's place in a scrolled window was blank)
            height = max(WINDOW[1], round(report["top"] + report["height"]) + 40)
            shot = _chromium(browser, Path(profile), height, f"--screenshot={out}",
                             copy.as_uri())
        if not out.exists():
            raise RuntimeError(f"chromium wrote no screenshot:\n{shot.stderr[-2000:]}")
    finally:
        copy.unlink()
    page = np.asarray(Image.open(out).convert("RGB"))
    difference = check(report, page)
    top = max(0, page.shape[0] - WINDOW[1])  # kept: the window's height, down to the figure
    Image.fromarray(page[top:]).save(out)
    return {**{k: v for k, v in report.items() if k != "src"}, "difference": difference}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the built site's folder")
    parser.add_argument("out", type=Path, help="the screenshot (PNG)")
    parser.add_argument("--page", default="notebooks/01_quickstart")
    parser.add_argument("--chromium", default=None, help="the browser (default: found on PATH)")
    args = parser.parse_args(argv)
    browser = args.chromium or find_chromium()
    if browser is None:
        print(f"no Chromium found ({', '.join(BROWSERS)}); pass --chromium PATH", file=sys.stderr)
        return 2
    try:
        report = screenshot(args.site, args.page, args.out.resolve(), browser)
    except RuntimeError as e:
        print(f"{args.page}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

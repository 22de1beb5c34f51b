"""The documentation: the site builds strict with the notebooks executed, and the README is short,
starts with the two commands, shows a figure the code made and holds an example that runs."""

import base64
import os
import re
import shutil
import subprocess
import sys
from html import escape as html_escape
from pathlib import Path

import nbformat
import pytest
from helpers import extra, script_module
from helpers_notebooks import run_checked, runner

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
COMMANDS = ("bash scripts/demo.sh", "bash scripts/test.sh")
FIGURE = ROOT / "docs" / "images" / "quickstart-loss.png"  # scripts/notebooks.py --figure
PNG = b"\x89PNG\r\n\x1a\n"


def _env(**extra_vars):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", **extra_vars)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def api_pages() -> dict[str, str]:
    """Each API page's package (``::: fxtrain.NAME`` in docs/api/NAME.md) and the page's name."""
    pages = {}
    for page in sorted((ROOT / "docs" / "api").glob("*.md")):
        first = re.search(r"^::: (\S+)", page.read_text("utf-8"), re.M)
        pages[first.group(1)] = page.stem
    return pages


def unrendered(site_dir: Path, package: str, page: str) -> list[str]:
    """The names in ``package.__all__`` with no entry on its rendered page: an anchor under the
    public name (``fxtrain.fit``) or under the object's own path (``fxtrain.loop._fit.fit``)."""
    import importlib
    import types

    module = importlib.import_module(package)
    html = (site_dir / "api" / page / "index.html").read_text("utf-8")
    anchors = set(re.findall(r'id="([\w.]+)"', html))
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if isinstance(obj, types.ModuleType):
            continue  # a package of its own: its own page
        own = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
        if f"{package}.{name}" not in anchors and own not in anchors:
            missing.append(name)
    return missing


def _check_api_reference(site_dir: Path) -> None:
    """Every public name has an entry in the API reference."""
    assert (site_dir / "api" / "fxtrain" / "index.html").exists()
    pages = api_pages()
    assert {"fxtrain", "fxtrain.callbacks", "fxtrain.optim"} <= set(pages)
    missing = {package: unrendered(site_dir, package, page) for package, page in pages.items()}
    missing = {k: v for k, v in missing.items() if v}
    assert not missing, f"public names without an entry in the API reference: {missing}"
    # planted: a name the page does not render is found
    html = site_dir / "api" / "fxtrain" / "index.html"
    text = html.read_text("utf-8")
    html.write_text(text.replace('id="fxtrain.fit"', 'id="elsewhere"'), "utf-8")
    try:
        assert unrendered(site_dir, "fxtrain", "fxtrain") == ["fit"]
    finally:
        html.write_text(text, "utf-8")


def png_size(data: bytes) -> tuple[int, int]:
    """A PNG's width and height, from its header; a ValueError if ``data`` is no PNG."""
    if data[:8] != PNG or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def page_figures(html: str) -> list[bytes]:
    """The PNG images embedded in a page (``<img src="data:image/png;base64,...">``)."""
    return [base64.b64decode(b) for b in re.findall(r'<img[^>]*src="data:image/png;base64,'
                                                    r'([A-Za-z0-9+/=\s]+)"', html)]


def printed_lines(nb) -> list[str]:
    """The first line each cell printed (stdout), as the page shows it (HTML-escaped)."""
    lines = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("name") == "stdout" and "\x1b" not in output["text"]:
                first = next((line for line in output["text"].splitlines() if line.strip()), None)
                if first is not None:
                    lines.append(html_escape(first, quote=False))
                break
    return lines


def _check_notebook_page(site_dir: Path, name: str, nb) -> None:
    """The notebook's page shows the executed notebook: each figure it made, as a PNG, and the
    first line each cell printed."""
    page = site_dir / "notebooks" / Path(name).stem / "index.html"
    assert page.exists(), f"no page for {name}"
    html = page.read_text("utf-8")
    made = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    shown = page_figures(html)
    assert made >= 1, f"{name} made no figure; each notebook page shows one"
    assert len(shown) == made, f"{name} made {made} figures; its page shows {len(shown)}"
    assert all(png_size(png) > (100, 100) for png in shown)
    lines = printed_lines(nb)
    assert lines, f"{name} printed nothing"
    missing = [line for line in lines if line not in html]
    assert not missing, f"{name}'s page lacks what its cells printed: {missing}"


@pytest.mark.slow
def test_the_site_builds_strict_with_the_notebooks_executed(tmp_path):
    """The site as a reader sees it, built once: each notebook run once and checked
    (helpers_notebooks.run_checked: a fresh kernel, no failed cell, no file left behind), then
    ``mkdocs build --strict`` from the executed copies, then the API reference, each notebook's
    page and the README's figure checked. One test, not a module fixture: under pytest-xdist two
    tests sharing a fixture may run on two workers, each building the site."""
    extra("mkdocs")
    extra("mkdocstrings_handlers.python")
    extra("mkdocs_jupyter")
    script = runner()
    executed = {}
    for path in script.notebooks():
        executed[path.name] = run_checked(path, tmp_path / "scratch" / path.stem)
        (tmp_path / "executed" / "notebooks").mkdir(parents=True, exist_ok=True)
        nbformat.write(executed[path.name], tmp_path / "executed" / "notebooks" / path.name)
    run = script.build_site(tmp_path / "site", tmp_path / "executed")
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    _check_api_reference(tmp_path / "site")
    for name, nb in executed.items():
        _check_notebook_page(tmp_path / "site", name, nb)
    # the README's figure is the quickstart's, as scripts/notebooks.py --figure writes it; its
    # pixels differ from machine to machine, its size does not
    made = png_size(script.figure_png(executed[script.FIGURE_NOTEBOOK]))
    assert png_size(script.FIGURE.read_bytes()) == made, (
        f"{script.FIGURE.relative_to(ROOT)} is not the size of the figure "
        f"{script.FIGURE_NOTEBOOK} makes ({made}); run `python scripts/notebooks.py OUT --figure`")


def test_the_planted_page_checks_fail():
    """A page without the figure, or without a printed line, fails its check."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=[
        nbformat.v4.new_output("stream", name="stdout", text="loss <0.5\nmore\n"),
        nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(
            FIGURE.read_bytes()).decode()})])])
    assert printed_lines(nb) == ["loss &lt;0.5"]
    assert page_figures('<img alt="" src="data:image/png;base64,'
                        + base64.b64encode(FIGURE.read_bytes()).decode() + '"/>') \
        == [FIGURE.read_bytes()]
    assert page_figures('<img src="quickstart-loss.png"/>') == []


def test_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text) <= 12_500, f"README.md has {len(text)} characters; keep it under 12,500"
    first = re.search(r"```bash\n(.*?)```", text, re.S)
    assert first is not None and text.index("```") == first.start(), "no bash block first"
    assert text[:first.start()].strip().startswith("# "), "the title comes before the commands"
    lines = [line.split("#")[0].strip() for line in first.group(1).splitlines()]
    assert lines == list(COMMANDS), f"the first block must be exactly {COMMANDS}, got {lines}"


def test_readme_links_point_at_files():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert targets, "the README links to the docs pages"
    missing = [t for t in targets if "://" not in t and not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_getting_started_shows_the_readme_example():
    example = re.search(r"```python\n.*?```", README.read_text("utf-8"), re.S).group(0)
    page = (ROOT / "docs" / "getting-started.md").read_text("utf-8")
    assert example in page, "docs/getting-started.md must hold the README's example as it is"


def test_readme_example_runs(tmp_path):
    """Runs the README's ``fx.fit`` example with fewer steps. Dynamo is off here so the test
    takes seconds; the compiled step itself is tested in test_step.py and test_fit.py."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text("utf-8"), re.S)
              if "fx.fit(" in b]
    assert len(blocks) == 1, "the README holds one python example that calls fx.fit"
    code, n = re.subn(r"max_steps=\d+", "max_steps=20", blocks[0])
    code, m = re.subn(r"eval_every=\d+", "eval_every=10", code)
    assert n == 1 and m == 1, "the example passes max_steps and eval_every to fx.fit"
    code += "\nassert int(state.step) == 20, int(state.step)\n"
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=_env(TORCHDYNAMO_DISABLE="1"))
    assert run.returncode == 0, f"the README example failed:\n{run.stdout}\n{run.stderr}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example.py"], "it wrote files"


def test_readme_shows_a_figure_the_code_made():
    """The README and the notebooks page show the quickstart's loss curve, a PNG that
    scripts/notebooks.py --figure writes (the site test checks it is that figure's size)."""
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README.read_text("utf-8"))
    assert images == [str(FIGURE.relative_to(ROOT))], images
    assert png_size(FIGURE.read_bytes()) > (100, 100)
    page = (ROOT / "docs" / "notebooks.md").read_text("utf-8")
    assert f"]({FIGURE.relative_to(ROOT / 'docs')})" in page


@pytest.mark.extended  # CI has no browser (and cannot install one)
def test_a_notebook_page_in_a_headless_browser_shows_its_figure(tmp_path):
    """scripts/screenshot_docs.py on the quickstart's page, from a strict build of the site with
    that notebook executed (the other pages as committed: this test looks at one): the figure
    loaded, lies within the window and is in the screenshot as the PNG it embeds. Planted: a
    figure that does not load fails."""
    extra("mkdocs")
    extra("mkdocstrings_handlers.python")
    extra("mkdocs_jupyter")
    shot = script_module("screenshot_docs")
    browser = shot.find_chromium()
    if browser is None:
        pytest.skip(f"no Chromium on PATH ({', '.join(shot.BROWSERS)}; Debian: apt-get install "
                    "chromium)")
    script = runner()
    copies = tmp_path / "executed" / "notebooks"
    copies.mkdir(parents=True)
    for path in script.notebooks():
        if path.name == script.FIGURE_NOTEBOOK:
            nbformat.write(run_checked(path, tmp_path / "scratch"), copies / path.name)
        else:
            shutil.copy(path, copies / path.name)
    built = script.build_site(tmp_path / "site", tmp_path / "executed")
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stdout}\n{built.stderr}"
    page = f"notebooks/{Path(script.FIGURE_NOTEBOOK).stem}"
    report = shot.screenshot(tmp_path / "site", page, tmp_path / "shot.png", browser)
    assert report["naturalWidth"] > 100 and report["difference"] <= shot.TOLERANCE, report
    assert png_size((tmp_path / "shot.png").read_bytes()) == shot.WINDOW
    html = tmp_path / "site" / page / "index.html"
    html.write_text(re.sub(r'src="data:image/png;base64,[^"]+"',
                           'src="data:image/png;base64,AAAA"', html.read_text("utf-8")), "utf-8")
    with pytest.raises(RuntimeError, match="did not load"):
        shot.screenshot(tmp_path / "site", page, tmp_path / "broken.png", browser)

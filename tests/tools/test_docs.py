"""The documentation: the site builds strict, and the README is short, starts with the two
commands and holds an example that runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import extra

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
COMMANDS = ("bash scripts/demo.sh", "bash scripts/test.sh")


def _env(**extra_vars):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", **extra_vars)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site, built once for the tests below: (the mkdocs run, the site folder)."""
    extra("mkdocs")
    extra("mkdocstrings_handlers.python")
    out = tmp_path_factory.mktemp("docs") / "site"
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    return run, out


def test_mkdocs_builds_strict(site):
    run, out = site
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    assert (out / "api" / "fxtrain" / "index.html").exists()


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


def test_every_public_name_has_an_entry_in_the_api_reference(site):
    run, out = site
    assert run.returncode == 0, run.stderr[-3000:]
    pages = api_pages()
    assert {"fxtrain", "fxtrain.callbacks", "fxtrain.optim"} <= set(pages)
    missing = {package: unrendered(out, package, page) for package, page in pages.items()}
    missing = {k: v for k, v in missing.items() if v}
    assert not missing, f"public names without an entry in the API reference: {missing}"
    # planted: a name the page does not render is found
    html = out / "api" / "fxtrain" / "index.html"
    text = html.read_text("utf-8")
    html.write_text(text.replace('id="fxtrain.fit"', 'id="elsewhere"'), "utf-8")
    try:
        assert unrendered(out, "fxtrain", "fxtrain") == ["fit"]
    finally:
        html.write_text(text, "utf-8")


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

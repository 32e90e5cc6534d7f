"""The documentation's code runs, and its API reference covers the public API.

Every ```python block of every page under `docs/` is run: one test per page, the
page's blocks in order in one namespace, as a reader pasting them one after the other
would run them. A block right after an HTML comment `<!-- skip -->` is not run.
"""

import pathlib
import re
import sys
import types

import jax
import pytest

import etrace
import etrace.nn
import etrace.testing


ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# A fenced block, possibly indented (inside a list item or an admonition), and
# whether `<!-- skip -->` stands on the line before it.
_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_SKIP = re.compile(r"<!--\s*skip\s*-->\s*$")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """`(line, code)` of every ```python block of a page that is not skipped."""
    blocks = []
    for match in _FENCE.finditer(text):
        if match["lang"].strip().split(" ")[0] not in ("python", "py"):
            continue
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if _SKIP.search(before):
            continue
        indent = match["indent"]
        lines = match["body"].splitlines()
        code = "\n".join(
            line[len(indent) :] if line.startswith(indent) else line for line in lines
        )
        blocks.append((text.count("\n", 0, match.start()) + 2, code))
    return blocks


PAGES = [p for p in sorted(DOCS.rglob("*.md")) if python_blocks(p.read_text())]


@pytest.fixture(autouse=True, scope="module")
def _quick_compilation():
    """The snippets are small and compiled once each, so XLA's optimisation passes
    cost more than they save: skip them while this module runs."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def test_fence_parser():
    page = (
        "text\n```python\na = 1\n```\n<!-- skip -->\n```python\nb = 2\n```\n"
        "- item\n\n    ```python\n    c = a + 1\n    ```\n```text\nd\n```\n"
    )
    assert python_blocks(page) == [(3, "a = 1"), (12, "c = a + 1")]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_runs(page, monkeypatch, tmp_path):
    blocks = python_blocks(page.read_text())
    # Blocks run as one module, registered so that dataclasses (every `eqx.Module`)
    # can resolve it; files they write land in a scratch directory.
    monkeypatch.chdir(tmp_path)
    name = "docs_" + re.sub(r"\W", "_", str(page.relative_to(DOCS).with_suffix("")))
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)
    for line, code in blocks:
        where = f"{page.relative_to(ROOT)}:{line}"
        exec(compile(code, where, "exec"), module.__dict__)


def test_readme_quick_start_runs(monkeypatch, tmp_path, capsys):
    # The README's quick start runs exactly as written, on its own.
    (code,) = [c for _, c in python_blocks((ROOT / "README.md").read_text())]
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("readme_quick_start")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, "README.md", "exec"), module.__dict__)
    printed = capsys.readouterr().out
    assert "cell.weight_hh" in printed and "cosine" in printed


def _public(module: types.ModuleType) -> set[str]:
    return {
        f"{module.__name__}.{name}"
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


def test_api_reference_covers_every_public_name():
    documented = set()
    for page in (DOCS / "api").glob("*.md"):
        documented |= set(re.findall(r"^::: ([\w.]+)", page.read_text(), re.M))
    public = _public(etrace) | _public(etrace.nn) | _public(etrace.testing)
    missing = sorted(public - documented)
    assert not missing, f"not in docs/api/*.md as `::: name`: {missing}"
    unknown = sorted(documented - public)
    assert not unknown, f"docs/api/*.md documents names that do not exist: {unknown}"

"""The documentation's code runs, its printed output is current, its formulas render
without a network, and its API reference covers the public API.

Every ```python block of every page under `docs/` is run: one test per page, the
page's blocks in order in one namespace, as a reader pasting them one after the other
would run them. A block right after an HTML comment `<!-- skip -->` is not run.

**Output blocks.** A fenced block right after an HTML comment `<!-- output -->`
(usually ```text) shows what the code before it prints: the test compares it with
what the page's python blocks printed since the previous output block, so every
printed line of that stretch is shown. Lines are compared one by one as
whitespace-separated words, so the padding of a table does not matter. An integer (a
shape, a count, a size in bytes) must match exactly. A decimal number may differ by 1%
of its value or by one unit of its last printed digit, whichever is larger
(`RTOL = 1e-2`): its last digits change with the CPU, the XLA version and its
optimisations (on CPU, the settings of `conftest.py` against XLA's defaults move
the numbers of `docs/index.md` by 9e-6 relative, after 400 training steps) and, on a
GPU, with float32 matrix products in TF32, which keeps about three decimal digits;
a value near a rounding boundary prints either way; a change of behaviour moves a
number by far more. Below `ATOL = 1e-4` a number is round-off and any two such
numbers agree: the relative error of an exact float32 gradient summed over a
sequence reaches 1e-5 (`readout.bias` on `docs/index.md`: 4.6e-07 with
`conftest.py`, 7.5e-06 with XLA's defaults), while every number the pages print
that is not round-off is above 1e-2. Whether a gradient is exact is checked
elsewhere, in float64.

A mismatch fails the test with the first differing line and everything the code
printed, ready to paste into the page.

A page runs in float32, JAX's default, as in a reader's fresh session, whatever this
test session uses; a page that needs float64 turns it on in its own code, where the
reader sees it (`jax.config.update("jax_enable_x64", True)` or
`etrace.testing.float64()`), and the setting is restored after the page.

**Formulas.** `$...$` and `$$...$$` are found by `pymdownx.arithmatex` and turned into
MathML while the site is built, by the hook `docs/hooks.py` with `latex2mathml`:
browsers draw MathML themselves, and the pages load no script, style sheet or font
from a network. The build itself fails on a formula that cannot be converted and on
a page that loads anything from a network; the tests here check `mkdocs.yml` and the
conversion of the constructions the pages use. They need the `docs` extra
(`latex2mathml`, and PyYAML with mkdocs) and are skipped without it.
"""

import contextlib
import importlib.util
import io
import itertools as it
import pathlib
import re
import sys
import types
from typing import NamedTuple

import jax
import pytest

import etrace
import etrace.nn
import etrace.testing


ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# A fenced block, possibly indented (inside a list item or an admonition), and the
# line before it, which may hold `<!-- skip -->` or `<!-- output -->`.
_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_SKIP = re.compile(r"<!--\s*skip\s*-->\s*$")
_OUTPUT = re.compile(r"<!--\s*output\s*-->\s*$")


class Block(NamedTuple):
    kind: str  # "python" (run) or "output" (compared with what was printed)
    line: int  # of the block's first line, counting from 1
    body: str  # without the fences and the indentation


def blocks(text: str) -> list[Block]:
    """The python blocks that are not skipped and the output blocks of a page, in
    the page's order."""
    found = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if _OUTPUT.search(before):
            kind = "output"
        elif match["lang"].strip().split(" ")[0] in ("python", "py"):
            if _SKIP.search(before):
                continue
            kind = "python"
        else:
            continue
        indent = match["indent"]
        lines = match["body"].splitlines()
        body = "\n".join(
            line[len(indent) :] if line.startswith(indent) else line for line in lines
        )
        found.append(Block(kind, text.count("\n", 0, match.start()) + 2, body))
    return found


def python_blocks(text: str) -> list[tuple[int, str]]:
    """`(line, code)` of every ```python block of a page that is not skipped."""
    return [(b.line, b.body) for b in blocks(text) if b.kind == "python"]


# An integer or a decimal number, not part of a name (`float32`, `l2`, `weight_ih`).
_NUMBER = re.compile(r"(?<![\w.])([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?!\w)")
RTOL = 1e-2
ATOL = 1e-4


def _same_number(shown: str, printed: str) -> bool:
    if _is_integer(shown) or _is_integer(printed):
        return shown == printed
    a, b = float(shown), float(printed)
    # A value that varies a little can round to either side of a printed digit
    # (the factor absorbs the binary round-off of the difference itself).
    digit = max(_last_digit(shown), _last_digit(printed)) * (1 + 1e-6)
    return abs(a - b) <= max(RTOL * max(abs(a), abs(b)), ATOL, digit)


def _is_integer(token: str) -> bool:
    return not any(c in token for c in ".eE")


def _last_digit(token: str) -> float:
    """The value of one unit in the last digit of a decimal number: 1e-4 for
    `6.958e-01`, 1e-3 for `0.037`."""
    mantissa, _, exponent = token.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def _same_line(shown: str, printed: str) -> bool:
    # Alternating text and numbers: text at even positions, numbers at odd ones.
    shown_parts = _NUMBER.split(" ".join(shown.split()))
    printed_parts = _NUMBER.split(" ".join(printed.split()))
    if len(shown_parts) != len(printed_parts):
        return False
    return all(
        a == b if i % 2 == 0 else _same_number(a, b)
        for i, (a, b) in enumerate(zip(shown_parts, printed_parts))
    )


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


def output_mismatch(shown: str, printed: str) -> str | None:
    """`None` if an output block `shown` matches the text `printed`, else the first
    line that differs."""
    for number, (a, b) in enumerate(
        it.zip_longest(_lines(shown), _lines(printed)), start=1
    ):
        if a is None or b is None or not _same_line(a, b):
            return f"line {number}: the page shows {a!r}, the code printed {b!r}"
    return None


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
        "<!-- output -->\n```text\n2\n```\n"
        "- item\n\n    <!-- output -->\n    ```text\n      3\n    ```\n"
    )
    assert python_blocks(page) == [(3, "a = 1"), (12, "c = a + 1")]
    assert blocks(page)[2:] == [Block("output", 19, "2"), Block("output", 25, "  3")]


def test_output_comparison():
    shown = "parameter  rel. error  cosine\ncell.weight_hh  6.958e-01  0.722505\n"
    assert output_mismatch(shown, shown) is None
    # Padding, trailing whitespace and blank lines at the ends do not matter.
    assert output_mismatch(shown, "\n" + shown.replace("  ", " ") + "  \n\n") is None
    # Decimal numbers agree to 1% or to one unit of their last digit, and
    # round-off-sized ones whatever their digits.
    assert output_mismatch("x 6.958e-01 4.615e-07", "x 6.99e-01 7.476e-06") is None
    assert output_mismatch("loss 0.037", "loss 0.038") is None
    assert output_mismatch("(float32) 0.5", "(float32) 0.5") is None
    # A stale block fails: a changed word, a number outside the tolerance, a changed
    # integer (a shape), a missing or an extra line.
    assert "line 2" in output_mismatch(shown, shown.replace("weight_hh", "weight"))
    assert output_mismatch("x 6.958e-01", "x 7.1e-01")
    assert output_mismatch("x 1.0e-03", "x 3.0e-03")
    assert output_mismatch("loss 0.037", "loss 0.039")
    assert output_mismatch("rate 0.000", "rate 0.033")
    assert output_mismatch("shape (1, 48, 1, 2, 1)", "shape (48, 2, 1)")
    assert output_mismatch("shape (48, 16)", "shape (48, 17)")
    assert output_mismatch("3.6 KiB", "3.6 B")
    assert output_mismatch("1", "1.0")
    assert output_mismatch("a\nb", "a")
    assert output_mismatch("a", "a\nb")
    assert output_mismatch("a", "")


def test_output_markers_precede_blocks():
    # A marker that is not right before a fence would leave its block unchecked.
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        marked = len(re.findall(r"<!--\s*output\s*-->", text))
        checked = sum(b.kind == "output" for b in blocks(text))
        assert marked == checked, f"{page}: `<!-- output -->` not right before a fence"


def run_page(text: str, where: str, module: types.ModuleType) -> list[str]:
    """Runs the python blocks of a page in `module`, in float32, and returns a
    message for each output block that does not match what was printed."""
    stale = []
    printed = io.StringIO()
    x64 = jax.config.read("jax_enable_x64")
    # Set globally, not with a context manager: a page's own
    # `jax.config.update("jax_enable_x64", True)` must take effect.
    jax.config.update("jax_enable_x64", False)
    try:
        for block in blocks(text):
            at = f"{where}:{block.line}"
            if block.kind == "python":
                with contextlib.redirect_stdout(printed):
                    exec(compile(block.body, at, "exec"), module.__dict__)
                continue
            mismatch = output_mismatch(block.body, printed.getvalue())
            if mismatch is not None:
                stale.append(
                    f"{at}: {mismatch}\nThe code printed:\n{printed.getvalue()}"
                )
            printed = io.StringIO()
    finally:
        jax.config.update("jax_enable_x64", x64)
    return stale


def test_run_page():
    page = (
        "```python\nimport jax.numpy as jnp\n\nprint(jnp.ones(2).dtype, 0.5)\n```\n"
        "<!-- output -->\n```text\nfloat32 0.5\n```\n"
        "```python\nprint(1)\n```\n```python\nprint(2)\n```\n"
        "<!-- output -->\n```text\n1\n3\n```\n"
        "```python\nimport jax\n\njax.config.update('jax_enable_x64', True)\n"
        "print(jnp.ones(2).dtype)\n```\n"
        "<!-- output -->\n```text\nfloat64\n```\n"
    )
    x64 = jax.config.read("jax_enable_x64")
    stale = run_page(page, "page.md", types.ModuleType("page"))
    # Pages start in float32 and may turn float64 on; what the test session had
    # comes back. Output since the previous output block is compared as a whole.
    assert len(stale) == 1 and stale[0].startswith("page.md:18: line 2")
    assert jax.config.read("jax_enable_x64") == x64


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_runs(page, monkeypatch, tmp_path):
    # Blocks run as one module, registered so that dataclasses (every `eqx.Module`)
    # can resolve it; files they write land in a scratch directory.
    monkeypatch.chdir(tmp_path)
    name = "docs_" + re.sub(r"\W", "_", str(page.relative_to(DOCS).with_suffix("")))
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)
    stale = run_page(page.read_text(), str(page.relative_to(ROOT)), module)
    assert not stale, "stale output blocks:\n\n" + "\n\n".join(stale)


def test_readme_quick_start_runs(monkeypatch, tmp_path, capsys):
    # The README's quick start runs exactly as written, on its own.
    (code,) = [c for _, c in python_blocks((ROOT / "README.md").read_text())]
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("readme_quick_start")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, "README.md", "exec"), module.__dict__)
    printed = capsys.readouterr().out
    assert "cell.weight_hh" in printed and "cosine" in printed


@pytest.fixture(scope="module")
def hooks() -> types.ModuleType:
    """`docs/hooks.py`, which needs `latex2mathml` from the `docs` extra."""
    pytest.importorskip("latex2mathml")
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_load_nothing_from_a_network(hooks):
    yaml = pytest.importorskip("yaml")  # comes with mkdocs

    class Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml may hold tags such as `!!python/name:...`; their values do not
    # matter here.
    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)
    assets = [
        entry["path"] if isinstance(entry, dict) else entry
        for key in ("extra_javascript", "extra_css")
        for entry in config.get(key) or []
    ]
    assert not hooks.network_addresses(assets)
    # The material theme links Google Fonts unless its font is turned off.
    assert config["theme"].get("font") is False
    assert "docs/hooks.py" in config["hooks"]
    assert {"pymdownx.arithmatex": {"generic": True}} in config["markdown_extensions"]
    # What the build checks on every page it writes.
    page = (
        '<link rel="canonical" href="https://example.org/etrace/">'
        '<link rel="stylesheet" href="assets/main.css">'
        "<link rel=preconnect href=https://fonts.gstatic.com>"
        '<script src="javascripts/x.js"></script><script>let a = 1</script>'
        "<script src='//cdn.example/mathjax.js'></script>"
    )
    assert hooks.network_addresses(hooks.loaded(page)) == [
        "https://fonts.gstatic.com",
        "//cdn.example/mathjax.js",
    ]


# Formulas of the pages and docstrings, with a piece of the MathML each must give:
# every construction the pages use at least once.
FORMULAS = [
    (  # docs/concepts.md, D-RTRL's trace
        r"\epsilon^t_{mik} = \sum_{k'} D^t[n(m), k, k']\, \epsilon^{t-1}_{mik'}"
        r"  + D_f^t[m, k]\, x^t_i,",
        "<munder><mo>∑</mo><mrow><mrow><mi>k</mi><mo>′</mo></mrow></mrow></munder>",
    ),
    (r"c^t = \frac{\partial L^t}{\partial h^t}", "<mfrac><mrow><mo>∂</mo><msup>"),
    (  # docs/algorithms/uoro.md
        r"\mathbb{E}[\tilde s\, \tilde\theta^\top] = M",
        '<mi>𝔼</mi><mo stretchy="false">[</mo><mover><mi>s</mi><mo stretchy="false">˜',
    ),
    (  # docs/algorithms/snap.md
        r"M^t = P_n \odot \big(J^t M^{t-1} + I^t\big)",
        '<mo>⊙</mo><mo minsize="1.2em" maxsize="1.2em">(</mo>',
    ),
    (  # docs/algorithms/ottt.md
        r'\hat a^t = \lambda\, \hat a^{t-1} + x^t \;\;\text{(mode "A")}',
        '<mspace width="0.278em" /><mtext>(mode\xa0"A")</mtext>',  # unbreakable
    ),
    (  # docs/concepts.md
        r"\nabla_\theta L = \sum_t \Big( c^t M^t + \frac{\partial L^t}{\partial \theta}"
        r"  \Big|_{h^t} \Big)",
        "<msub><mo>∇</mo><mi>θ</mi></msub>",
    ),
    (  # docs/algorithms/uoro.md
        r"\rho_0 = \sqrt{\frac{\lVert\tilde\theta\rVert}{\lVert J^t \tilde s\rVert}}",
        '<msqrt><mrow><mfrac><mrow><mo lspace="0" rspace="0">‖</mo>',
    ),
    (  # docs/nn.md, the refractory counter
        r"c \leftarrow \begin{cases} r & z = 1 \\ \max(c - 1, 0) & z = 0. \end{cases}",
        '<mtable><mtr><mtd columnalign="left"><mi>r</mi></mtd>',
    ),
    (  # a docstring: etrace.EProp's feedback weights
        r"\mathcal N(0, \mathrm{scale}^2 / \dim v)",
        "<mi>𝒩</mi>",
    ),
    (r"v \leftarrow \operatorname{reset}(v', z)", 'rspace="0">reset</mo>'),
    (r"O(H \lvert\theta\rvert)", '<mo lspace="0" rspace="0">|</mo><mi>θ</mi>'),
    (r"\tfrac{1}{\pi}\arctan(\tfrac{\pi}{2} k x) + \tfrac12", "<mfrac><mn>1</mn>"),
    (r"\dfrac{k}{\sqrt{2\pi}} e^{-(kx)^2/2}", '<mstyle displaystyle="true"'),
    (r"m \bmod N", "<mo>mod</mo>"),
    (r"\lVert g - g_\text{BPTT} \rVert", "<msub><mi>g</mi><mtext>BPTT</mtext></msub>"),
]


@pytest.mark.parametrize("tex, piece", FORMULAS, ids=[f[0][:32] for f in FORMULAS])
def test_formulas_become_mathml(hooks, tex, piece):
    mathml = hooks.to_mathml(tex, display=True)
    assert mathml.startswith('<math display="block"')
    assert piece in mathml
    assert "\\" not in mathml  # no TeX left


def test_formula_rendering_in_a_page(hooks, caplog):
    page = (
        '<p>A <span class="arithmatex">\\(x &lt; y\\)</span>, then</p>\n'
        '<div class="arithmatex">\\[a = 1,$$\n$$b = 2\\]</div>\n'
        '<span class="arithmatex">\\(\\notacommand x\\)</span>'
    )
    rendered = hooks.render_formulas(page, "page.md")
    assert '<span class="arithmatex"><math display="inline"' in rendered
    assert "<mo>&lt;</mo>" in rendered
    # Two `$$` lines without a blank line between them are two formulas.
    assert rendered.count('<math display="block"') == 2
    # A command latex2mathml does not know stays TeX, with a warning that fails a
    # strict build.
    assert "\\(\\notacommand x\\)" in rendered
    assert "page.md" in caplog.text and "notacommand" in caplog.text


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

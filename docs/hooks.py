"""MkDocs hooks: the formulas become MathML when the site is built, and the site loads
no script or style from a network, so that a copy of `site/` reads the same offline.

`pymdownx.arithmatex` (generic mode) puts every `$...$` of a page, and of a docstring
rendered by mkdocstrings, into `<span class="arithmatex">\\(...\\)</span>` and every
`$$...$$` into `<div class="arithmatex">\\[...\\]</div>`. `on_page_content` replaces
the TeX inside with the MathML of `latex2mathml`, which browsers draw themselves
(Chromium draws MathML Core, the part of MathML that `to_mathml` keeps to). A formula
it cannot convert, or a page that would load a script or a style sheet from a
network address, is a warning, and `strict: true` fails the build on it.
"""

import html
import logging
import re
from collections.abc import Iterable
from xml.etree import ElementTree

from latex2mathml.converter import convert


# Under `mkdocs.`, so that `strict: true` counts these warnings.
log = logging.getLogger("mkdocs.hooks.etrace")

_ARITHMATEX = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">(?P<tex>.*?)</(?P=tag)>', re.DOTALL
)
# arithmatex reads two `$$...$$` lines without a blank line between them as one
# block; TeX has no `$$` inside display maths, so there it separates two formulas.
_ADJACENT_DISPLAYS = re.compile(r"\$\$\s*\$\$")
_NETWORK = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)
_TAG = re.compile(r"<(?P<name>script|link)\b(?P<attributes>[^>]*)>", re.IGNORECASE)
_ATTRIBUTE = re.compile(
    r"""\b(?P<key>[\w-]+)=(?P<quote>["']?)(?P<value>[^"' >]*)(?P=quote)"""
)
# Links that name another page rather than load something into this one.
_NAVIGATION = {"canonical", "alternate", "prev", "next", "author", "license", "help"}
# A browser draws large operators and tall brackets only with a font that has
# OpenType maths tables, and its generic `math` family may name none: the usual
# ones of each system, first. The theme gives a display formula's box
# `overflow: auto`, and a MathML box reaches a pixel past its own, which would
# show a vertical scroll bar beside every formula.
_STYLE = (
    "<style>"
    ".md-typeset math { font-family: 'Latin Modern Math', 'STIX Two Math', "
    "'Cambria Math', 'DejaVu Math TeX Gyre', math; } "
    ".md-typeset div.arithmatex { overflow-y: hidden; }"
    "</style>"
)

_MATHML = "http://www.w3.org/1998/Math/MathML"
# MathML Core has no `mathvariant` but "normal" on a letter: `\mathcal` and
# `\mathbf` letters become the Unicode characters of their alphabet.
_LATIN = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_VARIANTS = {
    "script": dict(zip(_LATIN, "𝒜ℬ𝒞𝒟ℰℱ𝒢ℋℐ𝒥𝒦ℒℳ𝒩𝒪𝒫𝒬ℛ𝒮𝒯𝒰𝒱𝒲𝒳𝒴𝒵𝒶𝒷𝒸𝒹ℯ𝒻ℊ𝒽𝒾𝒿𝓀𝓁𝓂𝓃ℴ𝓅𝓆𝓇𝓈𝓉𝓊𝓋𝓌𝓍𝓎𝓏")),
    "bold": dict(zip(_LATIN, "𝐀𝐁𝐂𝐃𝐄𝐅𝐆𝐇𝐈𝐉𝐊𝐋𝐌𝐍𝐎𝐏𝐐𝐑𝐒𝐓𝐔𝐕𝐖𝐗𝐘𝐙𝐚𝐛𝐜𝐝𝐞𝐟𝐠𝐡𝐢𝐣𝐤𝐥𝐦𝐧𝐨𝐩𝐪𝐫𝐬𝐭𝐮𝐯𝐰𝐱𝐲𝐳")),
}
# `\hat` and `\tilde` come as the ASCII `^` and `~`, drawn as large symbols high
# above the letter; the spacing accents sit on it as in TeX.
_ACCENTS = {"^": "\u02c6", "~": "\u02dc"}
# A prime set as a superscript is drawn small and high above the letter; the prime
# character is a raised glyph already.
_PRIMES = {"\u2032", "\u2033", "\u2034"}
# Binary operators written as words keep the spacing of an operator.
_BINARY_WORDS = {"mod"}
# TeX spaces no vertical bar (`|x|`, `\lVert v \rVert`, `\Big|_{h}`); an `mo` inside a
# row would get an operator's space on either side.
_BARS = {"|", "\u2016"}


def to_mathml(tex: str, *, display: bool) -> str:
    """The MathML of one formula, `tex` without its delimiters.

    **Raises:** `ValueError` for a command that `latex2mathml` does not know (it
    would print it as it is), and whatever `latex2mathml` raises on TeX it cannot
    read.
    """
    math = ElementTree.fromstring(
        convert(tex, display="block" if display else "inline")
    )
    for element in math.iter():  # plain names, with `xmlns` kept as an attribute
        element.tag = element.tag.rpartition("}")[2]
        if "\\" in (element.text or ""):
            raise ValueError(f"latex2mathml does not know `{element.text}`")
    math.set("xmlns", _MATHML)
    for parent in math.iter():
        for element, following in zip(parent, [*parent[1:], None]):
            _restyle(element, following)
    return ElementTree.tostring(math, encoding="unicode")


def _restyle(element: ElementTree.Element, following: ElementTree.Element | None):
    text = element.text or ""
    if element.tag == "mi" and text in _VARIANTS.get(element.get("mathvariant"), {}):
        element.text = _VARIANTS[element.attrib.pop("mathvariant")][text]
    elif (
        element.tag == "mover"
        and element[1].tag == "mo"
        and element[1].text in _ACCENTS
    ):
        element[1].text = _ACCENTS[element[1].text]
        element[1].set("stretchy", "false")
        element.attrib.pop("accent", None)
    elif element.tag == "msup" and element[1].text in _PRIMES and not len(element[1]):
        element.tag = "mrow"
        element[1].tag = "mo"
    elif element.tag == "mo" and text in _BARS:
        element.set("lspace", "0")
        element.set("rspace", "0")
    elif element.tag in ("mi", "mo") and len(text) > 1 and text.isalpha():
        # A function name (`\max`, `\log`, `\operatorname{...}`) spaced as TeX
        # spaces one: a thin space before, and after unless a bracket or an
        # operator follows.
        if text in _BINARY_WORDS:
            return
        element.tag = "mo"
        element.set("lspace", "0.1667em")
        element.set(
            "rspace", "0" if getattr(following, "tag", "") == "mo" else "0.1667em"
        )


def render_formulas(page_html: str, where: str = "") -> str:
    """`page_html` with the TeX of every arithmatex element replaced by MathML. A
    formula that cannot be converted stays TeX, with a warning naming `where`."""

    def replace(match: re.Match) -> str:
        tex = html.unescape(match["tex"]).strip()
        display = match["tag"] == "div"
        opening, closing = (r"\[", r"\]") if display else (r"\(", r"\)")
        if not (tex.startswith(opening) and tex.endswith(closing)):
            log.warning(f"{where}: a formula without its delimiters: {tex!r}")
            return match[0]
        tex = tex[2:-2]
        parts = _ADJACENT_DISPLAYS.split(tex) if display else [tex]
        try:
            mathml = "".join(to_mathml(part, display=display) for part in parts)
        except Exception as error:  # latex2mathml raises many kinds
            log.warning(f"{where}: cannot turn {tex!r} into MathML: {error!r}")
            return match[0]
        return f'<{match["tag"]} class="arithmatex">{mathml}</{match["tag"]}>'

    return _ARITHMATEX.sub(replace, page_html)


def network_addresses(urls: Iterable[str]) -> list[str]:
    """Those of `urls` that point to another host (`https://...`, `//host/...`)."""
    return [url for url in map(str, urls) if _NETWORK.match(url.strip())]


def on_config(config):
    theme = config["theme"]
    if theme.name == "material" and theme.get("font") is not False:
        log.warning(
            "mkdocs.yml: the material theme loads its fonts from Google Fonts unless "
            "`theme: font: false`; set it, so that the site loads nothing from a "
            "network."
        )
    for key in ("extra_javascript", "extra_css"):
        for url in network_addresses(config[key]):
            log.warning(
                f"mkdocs.yml: `{key}` loads {url} from a network; serve it from "
                "`docs/` instead."
            )
    return config


def on_page_content(content, page, config, files):
    del config, files
    return render_formulas(content, page.file.src_uri)


def loaded(page_html: str) -> list[str]:
    """The addresses of the scripts, style sheets, fonts and icons a page loads."""
    urls = []
    for tag in _TAG.finditer(page_html):
        attributes = {
            match["key"].lower(): match["value"]
            for match in _ATTRIBUTE.finditer(tag["attributes"])
        }
        if tag["name"].lower() == "script":
            urls.append(attributes.get("src"))
        elif not set(attributes.get("rel", "").lower().split()) & _NAVIGATION:
            urls.append(attributes.get("href"))
    return [url for url in urls if url]


def on_post_page(output, page, config):
    del config
    for url in network_addresses(loaded(output)):
        log.warning(f"{page.file.src_uri}: the page loads {url} from a network.")
    return output.replace("</head>", _STYLE + "</head>", 1)

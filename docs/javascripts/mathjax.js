// MathJax set-up for the formulas on these pages.
//
// pymdownx.arithmatex (generic mode) turns `$...$` into `\(...\)` and `$$...$$` into
// `\[...\]`, each inside an element of class "arithmatex". MathJax is told to
// typeset those elements and to leave the rest of the page (code above all) alone.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*",
    processHtmlClass: "arithmatex",
  },
};

// The theme emits `document$` on the first load and after every page change made
// without a full reload; typeset the new content each time.
if (typeof document$ !== "undefined") {
  document$.subscribe(function () {
    if (window.MathJax && window.MathJax.typesetPromise) {
      window.MathJax.typesetClear();
      window.MathJax.typesetPromise();
    }
  });
}

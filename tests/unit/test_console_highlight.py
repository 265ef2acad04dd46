"""Workflow scripts highlighted with Pygments (api/console/highlight.py) and the generated stylesheet it ships."""
from __future__ import annotations

from pathlib import Path

from flowpool.api.console import highlight

STATIC = Path(highlight.__file__).parent / "static"


def test_the_shipped_pygments_stylesheet_is_what_pygments_generates() -> None:
    # How to regenerate it: the docstring of api/console/highlight.py.
    assert (STATIC / "pygments.css").read_text() == highlight.stylesheet()


def test_highlighted_scripts_carry_classes_line_numbers_and_escaped_text_but_no_inline_style() -> None:
    html = str(highlight.highlight_python('def execute(ctx):\n    return "<b>hi</b>"  # done\n'))
    assert '<span class="k">def</span>' in html and '<span class="c1"># done</span>' in html
    assert "&lt;b&gt;hi&lt;/b&gt;" in html and "<b>" not in html
    assert 'class="linenos"' in html and ">2</span>" in html.split('class="code"')[0]
    assert "style=" not in html  # the console's CSP blocks inline styles


def test_each_script_line_has_an_id_to_link_to_but_its_number_is_no_tab_stop() -> None:
    html = str(highlight.highlight_python("".join(f"x{n} = {n}\n" for n in range(1, 301))))
    # #L-12 in an address scrolls to line 12: the id is on the line itself (an <a> without href: not focusable).
    assert '<a id="L-12" name="L-12"></a>' in html and 'id="L-300"' in html
    # Hundreds of lines must not be hundreds of Tab stops: no line number is a link.
    assert "href=" not in html

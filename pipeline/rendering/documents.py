"""Documents from Jinja2 templates (``templates/``): the report and a study's report, in Markdown
and in HTML, and the README's generated section of a study.

A ``.html.j2`` template is rendered with autoescaping, so every value it shows is escaped (a
class name or a study's prose that holds ``<script>`` shows as text); a ``.md.j2`` template as
plain text. Filters: ``png`` embeds a PNG file as a data URI (a report opens anywhere as one
file, also in MLflow's artifact viewer, which shows no Markdown images), ``png_width`` reads its
width (to show a grid at a multiple of its pixels), ``relpath`` makes a
Markdown link relative to the document, ``inline`` turns the Markdown the reports use inline
(``**bold**``, ```code```) into HTML. Undefined values are errors, not blanks.
"""

import base64
import os
import re
from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def png_width(path: Path) -> int:
    """The width of a PNG in pixels (its IHDR chunk: bytes 16-19, big-endian)."""
    return int.from_bytes(Path(path).read_bytes()[16:20], "big")


def relpath(path: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def inline(text: str):
    """The Markdown the reports use inline as HTML: escaped, then **bold** and `code`."""
    from markupsafe import Markup, escape

    html = str(escape(text))
    html = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html)
    return Markup(re.sub(r"`(.+?)`", r"<code>\1</code>", html))


def is_file(path) -> bool:
    return path is not None and Path(path).is_file()


def _environment(html: bool):
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(TEMPLATES_DIR), autoescape=html, trim_blocks=True, lstrip_blocks=True,
                      keep_trailing_newline=True, undefined=StrictUndefined)
    env.filters.update(png=data_uri, png_width=png_width, relpath=relpath, inline=inline)
    env.tests["file"] = is_file
    return env


def render(template: str, **context) -> str:
    """``templates/<template>`` rendered with ``context`` (autoescaped when it is a ``.html.j2``)."""
    return _environment(template.endswith(".html.j2")).get_template(template).render(**context)

"""A Griffe extension for the docs build: innerloop's docstrings are Google style with Sphinx roles.

mkdocstrings renders docstrings as Markdown, where ``:class:`Algorithm``` would show the role's name
as text. This turns each role into a code span (``:func:`~innerloop.adapt.unroll``` -> ```unroll```,
the ``~`` keeping the last component as Sphinx does) and an rST literal-block marker ``::`` at the end
of a line into ``:`` (the indented block after it is a Markdown code block already). The package's
docstrings are not changed; only what the docs show.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj|const):`(~?)([^`]+)`")
LITERAL_MARKER = re.compile(r"(?<=\S)::$", re.MULTILINE)


def rewrite(text: str) -> str:
    """The docstring ``text`` with Sphinx roles as code spans and ``::`` markers as ``:``."""

    def span(match: re.Match[str]) -> str:
        target = match.group(2)
        return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"

    return LITERAL_MARKER.sub(":", ROLE.sub(span, text))


class SphinxRoles(griffe.Extension):
    """Rewrites every docstring as it is loaded (before mkdocstrings parses its sections)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)

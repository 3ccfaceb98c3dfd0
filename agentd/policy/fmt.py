"""`agentctl policy fmt`: one layout for every policy file, so that a review's diff is the
change and nothing else.

The layout: two-space indentation, every list and mapping in block style with one entry per
line (a grant added or removed is one diff line), lines up to 100 columns. Comments are kept,
and so is key order: a comment belongs to the key it stands next to, and reordering keys would
move comments away from what they explain. Formatting never changes meaning: the caller
validates the file first, and the tests check that every stage's effective policy (its content
hash) is the same before and after.

Written over ruamel.yaml's round-trip mode (the loader's library), which keeps comments and
quoting; only the layout is decided here.
"""

from __future__ import annotations

import io
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

WIDTH = 100


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = WIDTH
    return yaml


def format_text(text: str) -> str:
    """`text` (a valid policy or ceilings file) in the canonical layout."""
    yaml = _yaml()
    document = yaml.load(text)
    _block_style(document)
    out = io.StringIO()
    yaml.dump(document, out)
    return out.getvalue()


def _block_style(node: Any) -> None:
    """Every non-empty collection in block style, one entry per line (an empty one stays
    `[]` or `{}`: block style has no way to write it). Iterative: no recursion."""
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, CommentedMap):
            if current:
                current.fa.set_block_style()
            stack.extend(current.values())
        elif isinstance(current, CommentedSeq):
            if current:
                current.fa.set_block_style()
            stack.extend(current)

"""Reading policy and stages files: YAML to validated, located documents.

The YAML is composed into ruamel's node tree and turned into plain Python values by hand,
rather than loaded with a constructor, for three reasons:

- every key and list item keeps its line, which pydantic's error locations are mapped back
  to (`issues.line_of`), so each message names the line to fix;
- all duplicate keys are found with both lines (a constructor stops at the first, or keeps the
  last silently, depending on settings), and the later one is never the one that wins unseen;
- only plain YAML is accepted. Anchors, aliases and merge keys (`&`, `*`, `<<`) are refused:
  they let one line change what another line means, which is what a reviewer must not have to
  work out, and they are how "billion laughs" files are built. Tags other than the core ones
  (`!!binary`, `!custom`, an unquoted date) are refused with a hint to quote the value.

Errors of a file are all collected and raised together as one `PolicyFileError`.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from agentd.policy.cases import PolicyTests
from agentd.policy.issues import Issue, PolicyFileError, from_validation
from agentd.policy.model import Document, Policy, StageCeilings

MAX_FILE_BYTES: Final = 1 << 20

_TAG = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (_TAG + t for t in ("str", "int", "float", "bool", "null"))
_MAP, _SEQ, _MERGE = _TAG + "map", _TAG + "seq", _TAG + "merge"

D = TypeVar("D", bound=Document)


def load_policy(path: str | Path, raw: bytes | None = None) -> Policy:
    """Read and validate an agent's policy file; raise PolicyFileError listing every problem.
    With `raw`, those bytes are the file's (read once by `read_source`, or an accepted copy);
    problems still name `path`."""
    return _validate(Policy, _parse(path, raw))


def read_source(path: str | Path) -> bytes:
    """A policy file's bytes, bounded like every read of one; PolicyFileError if unreadable."""
    source = str(path)
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise PolicyFileError(
            [Issue(source, None, None, f"cannot read the file: {error.strerror or error}")]
        ) from None
    if len(raw) > MAX_FILE_BYTES:
        raise PolicyFileError(
            [Issue(source, None, None, "the file is larger than 1MiB; policies are short files")]
        )
    return raw


def load_stage_ceilings(path: str | Path) -> StageCeilings:
    """Read and validate the host's stage ceilings (stages.yaml); raise PolicyFileError."""
    return _load(path, StageCeilings)


def load_policy_tests(path: str | Path) -> PolicyTests:
    """A file of policy test cases (`agentctl policy test`), validated like a policy."""
    return _load(path, PolicyTests)


def check_policy_file(path: str | Path) -> Policy | StageCeilings:
    """Validate a file of either kind, chosen by its `kind:` (for `agentctl policy check`).

    A file whose kind is neither is validated as a Policy, whose error then names both kinds.
    """
    parsed = _parse(path)
    model: type[Policy] | type[StageCeilings] = Policy
    if isinstance(parsed.data, dict) and parsed.data.get("kind") == "StageCeilings":
        model = StageCeilings
    return _validate(model, parsed)


def load_document(path: str | Path, model: type[D], raw: bytes | None = None) -> D:
    """Any reviewed YAML document (a graph file too) read and validated as `model`, with the
    same errors as a policy's: file, line and field. With `raw`, those bytes are the file."""
    return _validate(model, _parse(path, raw))


def _load(path: str | Path, model: type[D]) -> D:
    return _validate(model, _parse(path))


def _validate(model: type[D], parsed: _Parsed) -> D:
    source, data, lines, issues, replaced = parsed
    if not isinstance(data, dict):
        raise PolicyFileError(issues)
    try:
        document = model.model_validate(data)
    except ValidationError as error:
        found = from_validation(error, model, source, lines)
        # A value already reported as bad YAML (an alias, a tag) is not reported again.
        issues.extend(i for i in found if not any(_within(i.field, p) for p in replaced))
    if issues:
        raise PolicyFileError(issues)
    document.attach(source, lines)
    return document


class _Parsed(NamedTuple):
    source: str
    data: Any
    lines: dict[str, int]
    """The 1-based line of each dotted field ("" is the document)."""
    issues: list[Issue]
    replaced: list[str]
    """Fields whose value was refused as YAML and replaced by None."""


def _parse(path: str | Path, raw: bytes | None = None) -> _Parsed:
    """Read and compose the file into plain data, lines and YAML-level issues."""
    source = str(path)
    text = _decode(read_source(path) if raw is None else raw, source)
    try:
        root = YAML(typ="rt").compose(io.StringIO(text))
    except MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = error.problem or error.context or "not valid YAML"
        if error.context and error.context_mark and error.problem:
            # e.g. "while parsing a flow sequence (from line 9): expected ',' or ']'"
            problem = f"{error.context} (from line {error.context_mark.line + 1}): {problem}"
        raise PolicyFileError(
            [Issue(source, line, None, f"YAML syntax error: {problem}; fix the YAML")]
        ) from None
    except YAMLError as error:
        raise PolicyFileError([Issue(source, None, None, f"YAML error: {error}")]) from None
    if root is None:
        raise PolicyFileError(
            [Issue(source, 1, None, "the file is empty; a policy starts with"
                   " 'apiVersion: agentd/v1' and 'kind: Policy'")]
        )
    builder = _Builder(source)
    data = builder.build(root, "")
    if not isinstance(root, MappingNode) or not isinstance(data, dict):
        builder.issues.append(
            Issue(source, root.start_mark.line + 1, None,
                  f"the top level must be a mapping (apiVersion: ..., kind: ...), not"
                  f" {_kind_of(root)}")
        )
    return _Parsed(source, data, builder.lines, builder.issues, builder.replaced)


def _decode(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise PolicyFileError(
            [Issue(source, line, None, f"not valid UTF-8 (byte {error.start}); save as UTF-8")]
        ) from None


class _Builder:
    """Node tree -> plain values, recording lines and every structural problem."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[str, int] = {}
        self.issues: list[Issue] = []
        self.replaced: list[str] = []

    def build(self, node: Node, path: str) -> Any:
        line = node.start_mark.line + 1
        self.lines.setdefault(path, line)
        if getattr(node, "anchor", None):
            self._issue(
                path, "YAML anchors and aliases (&name, *name) are not allowed in policy files;"
                " write the value out where it applies",
            )
            self.replaced.append(path)
            return None
        if isinstance(node, MappingNode):
            return self._mapping(node, path)
        if isinstance(node, SequenceNode):
            if node.tag != _SEQ:
                self._issue(path, f"YAML tag {node.tag!r} is not allowed here; remove it")
            items = []
            for index, item in enumerate(node.value):
                child = f"{path}[{index}]"
                self.lines[child] = item.start_mark.line + 1
                items.append(self.build(item, child))
            return items
        assert isinstance(node, ScalarNode)
        return self._scalar(node, path)

    def _mapping(self, node: MappingNode, path: str) -> dict[str, Any] | None:
        if node.tag != _MAP:
            self._issue(path, f"YAML tag {node.tag!r} is not allowed here; remove it")
        result: dict[str, Any] = {}
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE:
                self._issue(path, "YAML merge keys (<<) are not allowed in policy files;"
                                  " write the fields out", key_line)
                continue
            if not isinstance(key_node, ScalarNode) or key_node.tag != _STR:
                shown = key_node.value if isinstance(key_node, ScalarNode) else "a collection"
                self._issue(path, f"key {shown!r} is not a name; keys are plain words"
                                  " (quote it if it really is one)", key_line)
                continue
            key = key_node.value
            child = f"{path}.{key}" if path else key
            if key in first:
                self._issue(child, f"duplicate key {key!r} (first at line {first[key]});"
                                   " remove one of them", key_line)
                continue
            first[key] = key_line
            self.lines[child] = key_line
            result[key] = self.build(value_node, child)
        return result

    def _scalar(self, node: ScalarNode, path: str) -> Any:
        text: str = node.value
        try:
            if node.tag == _STR:
                return text
            if node.tag == _NULL:
                return None
            if node.tag == _BOOL:
                return text.lower() == "true"
            if node.tag == _INT:
                return _yaml_int(text)
            if node.tag == _FLOAT:
                return _yaml_float(text)
        except ValueError:
            pass
        self._issue(path, f"{text!r} is not plain YAML text or a number (YAML type"
                          f" {str(node.tag).removeprefix(_TAG)!r}); put it in quotes")
        self.replaced.append(path)
        return None

    def _issue(self, path: str, message: str, line: int | None = None) -> None:
        where = line if line is not None else self.lines.get(path)
        self.issues.append(Issue(self.source, where, path or None, message))


def _yaml_int(text: str) -> int:
    digits = text.replace("_", "")
    sign = -1 if digits.startswith("-") else 1
    digits = digits.lstrip("+-")
    for prefix, base in (("0o", 8), ("0x", 16), ("0b", 2)):
        if digits.lower().startswith(prefix):
            return sign * int(digits[2:], base)
    return sign * int(digits, 10)


def _yaml_float(text: str) -> float:
    lowered = text.lower().replace("_", "")
    if lowered.lstrip("+-") == ".inf":
        return -math.inf if lowered.startswith("-") else math.inf
    if lowered == ".nan":
        return math.nan
    return float(lowered)


def _kind_of(node: Node) -> str:
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, ScalarNode):
        return f"the single value {node.value!r}"
    return "a mapping with a tag"


def _within(field: str | None, bad: str) -> bool:
    return field is not None and (field == bad or field.startswith((bad + ".", bad + "[")))


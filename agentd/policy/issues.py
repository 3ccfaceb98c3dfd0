"""Turning what is wrong with a policy file into messages a reviewer can act on.

pydantic reports an error as a location tuple and a terse message ("Extra inputs are not
permitted" at `('stages', 'prototype', 'limtis')`). A reviewer needs the file, the line, the
dotted field and what to write instead. This module does that translation in one place, for
every kind of error, and `PolicyFileError` carries all of a file's problems at once so that
fixing a file is one round trip, not one per mistake.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from agentd.errors import PolicyError
from agentd.policy.model import ConflictingRulesError


@dataclass(frozen=True, order=True)
class Issue:
    """One problem in one file, at one line and field (either may be unknown)."""

    file: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.field:
            return f"{where}: {self.field}: {self.message}"
        return f"{where}: {self.message}"


class PolicyFileError(PolicyError):
    """All problems of one policy or stages file, one per line; `file/line/field` of the first.

    Callers that only show the error can print `str(err)`; `issues` has each one separately.
    """

    def __init__(self, issues: Sequence[Issue]) -> None:
        ordered = sorted(set(issues), key=lambda i: (i.line or 0, i.field or "", i.message))
        first = ordered[0]
        rest = "".join("\n" + str(issue) for issue in ordered[1:])
        super().__init__(first.message + rest, file=first.file, line=first.line, field=first.field)
        self.issues: tuple[Issue, ...] = tuple(ordered)


def dotted(loc: Iterable[int | str]) -> str:
    """`('stages', 'prototype', 'exec', 'allow', 2)` -> `stages.prototype.exec.allow[2]`."""
    text = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for "the key of this mapping entry"
            continue
        if isinstance(part, str) and _union_branch(part):
            continue  # `network: none | {egress: ...}`: the branch is not a field of the file
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


# The model branches of unions in policy files (pydantic puts the branch in the location).
_UNION_BRANCHES = frozenset({"NetworkRules", "NetworkCeiling"})


def _union_branch(part: str) -> bool:
    """Whether a location part names a branch of a union (`NetworkRules`, `literal['none']`)
    rather than a field or a key of the file."""
    return part in _UNION_BRANCHES or part.startswith("literal[")


def line_of(field: str, lines: Mapping[str, int]) -> int | None:
    """The line of `field`, or of its nearest written ancestor (for a missing field)."""
    path = field
    while path:
        if path in lines:
            return lines[path]
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return lines.get("")


def from_validation(
    error: ValidationError, root: type[BaseModel], file: str, lines: Mapping[str, int]
) -> list[Issue]:
    """Every error pydantic found, located and explained."""
    issues: list[Issue] = []
    for detail in error.errors():
        cause = detail.get("ctx", {}).get("error")
        if isinstance(cause, ConflictingRulesError):
            base = dotted(detail["loc"])
            for sub, message in cause.issues:
                field = f"{base}.{sub}" if base else sub
                issues.append(Issue(file, line_of(field, lines), field, message))
            continue
        if (any(isinstance(p, str) and p.startswith("literal[") for p in detail["loc"])
                and isinstance(detail.get("input"), Mapping)):
            continue  # a mapping was written: the error of the mapping's branch says why
        field = dotted(detail["loc"])
        issues.append(
            Issue(file, line_of(field, lines), field or None, explain(detail, root))
        )
    return issues


def explain(detail: ErrorDetails, root: type[BaseModel]) -> str:
    """What is wrong and what to write instead, for one pydantic error."""
    kind = detail["type"]
    loc = detail["loc"]
    name = str(loc[-1]) if loc else ""
    ctx = detail.get("ctx", {})
    got = show(detail.get("input"))
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind == "extra_forbidden":
        return _unknown_field(root, loc)
    if kind == "missing":
        return _missing(root, loc)
    if kind == "literal_error":
        if name == "apiVersion":
            return f"apiVersion {got} is not supported; write apiVersion: agentd/v1"
        if name == "kind":
            return (
                f"kind {got} is not {ctx.get('expected')}; write kind: Policy for an agent's"
                " policy, or kind: StageCeilings for the host's stages.yaml"
            )
        return f"{got} is not allowed; use {ctx.get('expected')}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping of names to values, not {got}"
    if kind in ("tuple_type", "list_type", "iterable_type"):
        hint = f"; write [{detail['input']}]" if isinstance(detail.get("input"), str) else ""
        return f"must be a list such as [a, b], not {got}{hint}"
    if kind == "string_type":
        return f"must be text, not {got}; put it in quotes"
    if kind == "bool_type":
        return f"must be true or false, not {got}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be a whole number, not {got}"
    if kind == "greater_than":
        return f"must be more than {ctx.get('gt')}, not {got}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}, not {got}; use a smaller number"
    if kind == "string_too_long":
        return f"is longer than {ctx.get('max_length')} characters; shorten it"
    return f"{detail['msg']} (got {got})"


def show(value: Any) -> str:
    """A short rendering of a value from the file, saying what kind of thing it is."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unknown_field(root: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    name = str(loc[-1])
    model = _model_at(root, loc[:-1])
    if model is None:
        return f"unknown field {name!r}; remove it"
    allowed = [info.alias or key for key, info in model.model_fields.items()]
    if model.__name__.endswith("Stages"):
        return f"unknown stage {name!r}; stages are {', '.join(allowed)}"
    close = difflib.get_close_matches(name, allowed, n=1)
    guess = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown field {name!r}; {guess}fields here are {', '.join(allowed)}"


def _missing(root: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    name = str(loc[-1])
    if name == "apiVersion":
        return "apiVersion is missing; add apiVersion: agentd/v1 at the top"
    if name == "kind":
        return "kind is missing; add kind: Policy (or kind: StageCeilings for stages.yaml)"
    model = _model_at(root, loc[:-1])
    if model is not None and model.__name__.endswith("Stages"):
        return f"stage {name!r} is missing; a stages file gives a ceiling for every stage"
    return f"required field {name!r} is missing; add it"


def _model_at(root: type[BaseModel], loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The model class that validates the mapping at `loc`, if it is a model."""
    model = root
    for part in loc:
        if not isinstance(part, str):
            return None
        if _union_branch(part):
            continue
        fields = {info.alias or key: info for key, info in model.model_fields.items()}
        if part not in fields:
            return None
        inner = _model_in(fields[part].annotation)
        if inner is None:
            return None
        model = inner
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None

"""The JSON Schema of policy files, for editors and for reviewers' tools.

The schema is generated from the pydantic models, never written by hand, and committed as
`policies/schema/policy.schema.json` so that editors (yaml-language-server, via the
`# yaml-language-server: $schema=...` line at the top of each policy) can use it without
running Python. A test compares the committed file with `policy_json_schema()`, so the two
cannot drift. To regenerate it:

    .venv/bin/python -m agentd.policy.schema > policies/schema/policy.schema.json
    .venv/bin/python -m agentd.policy.schema stages   # the schema of stages.yaml, on stdout

The schema describes what a file may contain; some rules are only checked by the loader
(env.log names must be set or allowed, inherited across stages), and its error messages are
better than an editor's, so `agentctl policy check` stays the authority.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Final

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from agentd.policy.model import Policy, StageCeilings

JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"


class _Generator(GenerateJsonSchema):
    """Leaves `null` out of optional fields: the loader refuses `prototype:` with no value
    (write `{}` to declare a stage with the defaults), so an editor should not offer it."""

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        if schema.get("default", ...) is None:
            return self.generate_inner(schema["schema"])
        return super().default_schema(schema)


def policy_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of an agent's policy file."""
    return _schema(Policy, "agentd policy")


def stage_ceilings_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the host's stages.yaml."""
    return _schema(StageCeilings, "agentd stage ceilings")


def render(schema: dict[str, Any]) -> str:
    """The schema as the committed file spells it (stable key order, trailing newline)."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def _schema(model: type[BaseModel], title: str) -> dict[str, Any]:
    body = model.model_json_schema(
        by_alias=True, mode="validation", schema_generator=_Generator
    )
    body["title"] = title
    return {"$schema": JSON_SCHEMA_DIALECT, **body}


def main(argv: list[str]) -> int:
    """Print the policy schema, or with the argument `stages`, the stages.yaml schema."""
    if argv not in ([], ["policy"], ["stages"]):
        sys.stderr.write("usage: python -m agentd.policy.schema [policy|stages]\n")
        return 2
    schema = stage_ceilings_json_schema() if argv == ["stages"] else policy_json_schema()
    sys.stdout.write(render(schema))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

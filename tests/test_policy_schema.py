"""The committed JSON Schemas match the models, so they cannot drift."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agentd.policy import policy_json_schema
from agentd.policy.schema import render, stage_ceilings_json_schema

REPO = Path(__file__).resolve().parent.parent
SCHEMA_DIR = REPO / "policies" / "schema"
REGENERATE = "python -m agentd.policy.schema > policies/schema/policy.schema.json"


class TestSchema:
    def test_policy_schema_file_matches_models(self) -> None:
        """policies/schema/policy.schema.json is exactly what the models generate."""
        committed = (SCHEMA_DIR / "policy.schema.json").read_text()
        assert committed == render(policy_json_schema()), f"stale; run {REGENERATE}"

    def test_stages_schema_file_matches_models(self) -> None:
        """policies/schema/stages.schema.json is exactly what the models generate."""
        committed = (SCHEMA_DIR / "stages.schema.json").read_text()
        assert committed == render(stage_ceilings_json_schema()), (
            "stale; run python -m agentd.policy.schema stages"
            " > policies/schema/stages.schema.json"
        )

    def test_module_prints_the_schema(self) -> None:
        """`python -m agentd.policy.schema` prints the committed file, with no warnings."""
        result = subprocess.run(
            [sys.executable, "-W", "error", "-m", "agentd.policy.schema"],
            capture_output=True, text=True, check=True, cwd=REPO,
        )
        assert result.stdout == (SCHEMA_DIR / "policy.schema.json").read_text()
        assert result.stderr == ""

    def test_unknown_fields_forbidden_everywhere(self) -> None:
        """Every object in the schema forbids properties it does not name."""
        schema = policy_json_schema()
        objects = [schema, *schema["$defs"].values()]
        assert all(obj.get("additionalProperties") is False for obj in objects)

    def test_describes_the_format(self) -> None:
        """The schema requires apiVersion, kind, name, stages and knows the four stages."""
        schema = policy_json_schema()
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert set(schema["required"]) == {"apiVersion", "kind", "name", "stages"}
        assert schema["properties"]["apiVersion"]["const"] == "agentd/v1"
        stages = schema["$defs"]["PolicyStages"]["properties"]
        assert list(stages) == ["prototype", "sandbox", "pilot", "production"]
        limits = schema["$defs"]["Limits"]["properties"]
        assert limits["memory"]["default"] == "256MiB"
        assert limits["wall_time"]["default"] == "60s"
        json.dumps(schema)  # plain JSON, nothing Python-specific

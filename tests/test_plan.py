import json

import pytest
from pydantic import ValidationError

from apwa_jupyter.plans import Plan, plan_json_schema, validate_plan

from .conftest import map_plan

TABLES = {"reviews": ["text", "stars"]}


def problems(data, tools=()):
    return validate_plan(Plan.model_validate(data), TABLES, tools)


def test_valid_map_plan_has_no_problems():
    assert (
        problems(
            map_plan("reviews", "Is {text} positive?", [{"name": "positive", "type": "boolean"}])
        )
        == []
    )


def test_unknown_source_column_tool_and_output_are_reported():
    data = map_plan("reveiws", "Is {txt} positive?", [{"name": "positive", "type": "boolean"}])
    data["stages"][0]["tools"] = ["search"]
    data["output"] = "nope"
    found = "\n".join(problems(data))
    assert "reads source 'reveiws'" in found
    assert "tool 'search'" in found
    assert "output 'nope'" in found


def test_placeholder_must_be_a_column_of_the_source():
    data = map_plan("reviews", "Is {txt} positive?", [{"name": "positive", "type": "boolean"}])
    assert any("placeholder {txt}" in p and "['text', 'stars']" in p for p in problems(data))


def test_cycles_are_found():
    data = map_plan("reviews", "x", [{"name": "a", "type": "string"}])
    second = dict(data["stages"][0], id="again", source="label")
    data["stages"][0]["depends_on"] = ["again"]
    data["stages"].append(second)
    assert any("cycle" in p for p in problems(data))


def test_output_may_not_overwrite_an_input_column():
    data = map_plan("reviews", "x", [{"name": "stars", "type": "integer"}])
    assert any("overwrite input column 'stars'" in p for p in problems(data))


def test_chained_stage_sees_upstream_outputs():
    data = map_plan("reviews", "{text}", [{"name": "product", "type": "string"}])
    data["stages"].append(
        dict(
            data["stages"][0],
            id="second",
            source="label",
            instruction="Price of {product}?",
            outputs=[{"name": "price", "type": "number", "description": "", "choices": []}],
        )
    )
    data["output"] = "second"
    assert problems(data) == []
    assert Plan.model_validate(data).order() == ["label", "second"]


def test_schema_is_bounded_and_strict():
    schema = plan_json_schema()
    text = json.dumps(schema)
    assert '"oneOf"' not in text and '"anyOf"' in text
    assert schema["properties"]["stages"]["maxItems"] <= 8

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node["additionalProperties"] is False
                assert set(node["required"]) == set(node["properties"])
            if node.get("type") == "array":
                assert "maxItems" in node, node
            if node.get("type") == "string" and "enum" not in node and "const" not in node:
                assert "maxLength" in node or "pattern" in node, node
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)


def test_unknown_fields_and_kinds_are_rejected_by_the_schema():
    data = map_plan("reviews", "x", [{"name": "a", "type": "string"}])
    data["stages"][0]["kind"] = "loop"
    with pytest.raises(ValidationError):
        Plan.model_validate(data)

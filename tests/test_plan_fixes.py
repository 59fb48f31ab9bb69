from apwa_jupyter.plan_fixes import fix_plan
from apwa_jupyter.plans import Plan, validate_plan

TABLES = {"reviews": ["text"]}


def stage(**extra):
    base = {
        "id": "label",
        "kind": "map",
        "source": "reviews",
        "batch_size": 1,
        "instruction": "Read this review: {text}",
        "tools": [],
        "depends_on": [],
        "outputs": [
            {
                "name": "sentiment",
                "type": "string",
                "description": "",
                "choices": ["positive", "negative"],
            }
        ],
    }
    return base | extra


def test_the_tiny_models_actual_mistakes_are_fixed_and_reported():
    # Shape of what SmolLM2-135M returned here: the stage repeated, junk tools and dependencies,
    # an unknown output stage, an output named like the input column, an unknown placeholder.
    junk = stage(
        tools=["Thetrap", "Thetrap"],
        depends_on=["Thetrap", "label"],
        instruction="Read this review: {product_name}",
        outputs=[
            {"name": "text", "type": "string", "description": "", "choices": []},
            {"name": "text", "type": "string", "description": "", "choices": []},
            {"name": "stars", "type": "integer", "description": "", "choices": ["1"]},
        ],
    )
    plan = Plan.model_validate({"summary": "Thetrap", "stages": [junk] * 3, "output": "Thetrap"})
    fixed, fixes = fix_plan(plan, TABLES, tools=[])
    assert validate_plan(fixed, TABLES, []) == []
    only = fixed.stages[0]
    assert len(fixed.stages) == 1 and fixed.output == "label"
    assert only.tools == [] and only.depends_on == []
    assert [f.name for f in only.outputs] == ["text_answer", "stars"]
    assert only.outputs[1].choices == []
    assert only.instruction == "Read this review: product_name"
    text = " | ".join(fixes)
    for expected in (
        "repeated stage",
        "unregistered tools ['Thetrap']",
        "output 'Thetrap' is not a stage",
        "renamed 'text_answer'",
        "unknown placeholders",
    ):
        assert expected in text, text


def test_unknown_source_becomes_the_only_table_but_not_with_two_tables():
    plan = Plan.model_validate(
        {"summary": "s", "stages": [stage(source="reveiws")], "output": "label"}
    )
    fixed, fixes = fix_plan(plan, TABLES, tools=[])
    assert fixed.stages[0].source == "reviews" and "only table" in fixes[0]
    two = {"reviews": ["text"], "orders": ["id"]}
    fixed, _ = fix_plan(plan, two, tools=[])
    assert fixed.stages[0].source == "reveiws"  # ambiguous: left for the model to repair
    assert any("reads source 'reveiws'" in p for p in validate_plan(fixed, two, []))


def test_a_valid_plan_is_untouched_and_tools_are_never_added():
    plan = Plan.model_validate(
        {"summary": "s", "stages": [stage(tools=["lookup"])], "output": "label"}
    )
    fixed, fixes = fix_plan(plan, TABLES, tools=["lookup", "other"])
    assert fixes == [] and fixed == plan

"""Every notebook's parameters are discoverable the papermill way (`papermill --help-notebook`,
`papermill.inspect_notebook`): each one found, typed and explained, and each one used. Read from the
notebook files; nothing is executed."""
import ast
import dataclasses
import json
import typing
from typing import Optional  # noqa: F401 (the annotations are evaluated in this namespace)

import papermill
import pytest

from helpers.config import TrainConfig
from test_notebooks import NOTEBOOKS

NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
LAUNCH = {"launch_ddp", "nproc_per_node"}  # notebook 03's own parameters, besides TrainConfig's fields


def code_cells(name: str) -> tuple[str, list[str]]:
    """(the parameters cell's source, the other code cells' sources)."""
    cells = json.loads((NOTEBOOKS / name).read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, name
    return "".join(params[0]["source"]), ["".join(c["source"]) for c in code if c is not params[0]]


def declared(source: str) -> list[str]:
    """Names the parameters cell assigns, in order (imports are not parameters)."""
    tree = ast.parse(source)
    names = []
    for node in tree.body:
        if isinstance(node, ast.AnnAssign):
            names.append(node.target.id)
        elif isinstance(node, ast.Assign):
            names.extend(t.id for t in node.targets)
    return names


def read_names(sources: list[str]) -> set[str]:
    """Every name the cells read (IPython's display() and %magics aside, the cells are plain Python)."""
    return {n.id for s in sources for n in ast.walk(ast.parse(s)) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def annotation(type_name: str):
    return eval(type_name, {"Optional": Optional})  # noqa: S307 (our own notebooks' annotations)


def fits(value, typ) -> bool:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Union:
        return any(fits(value, a) for a in args)
    if typ is type(None):
        return value is None
    if origin in (list, dict):
        items = value.items() if origin is dict and isinstance(value, dict) else [(v,) for v in value] if isinstance(value, list) else None
        return items is not None and all(fits(v, t) for item in items for v, t in zip(item, args))
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, typ)


@pytest.mark.parametrize("name", NAMES)
def test_papermill_finds_every_parameter_with_a_type_and_a_help_text(name):
    found = papermill.inspect_notebook(str(NOTEBOOKS / name))
    source, _ = code_cells(name)
    assert list(found) == declared(source), "papermill's parser skipped a line (an '=' in a comment, 'int | None')"
    for param, info in found.items():
        assert info["inferred_type_name"] not in ("None", "", None), f"{name}: {param} has no type"
        typ = annotation(info["inferred_type_name"])
        default = ast.literal_eval(info["default"])
        assert fits(default, typ), f"{name}: {param} = {default!r} is not a {typ}"
        assert info["help"], f"{name}: {param} has no comment"


@pytest.mark.parametrize("name", [n for n in NAMES if not n.startswith("03")])
def test_every_parameter_is_used(name):
    source, later = code_cells(name)
    assert set(declared(source)) <= read_names(later), f"{name}: parameters no cell reads"


def test_03_parameters_are_the_train_config_fields_with_their_types_and_defaults():
    found = papermill.inspect_notebook(str(NOTEBOOKS / "03_train.ipynb"))
    assert set(found) == set(TrainConfig.field_names()) | LAUNCH
    hints = typing.get_type_hints(TrainConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for field in TrainConfig.field_names():
        assert annotation(found[field]["inferred_type_name"]) == hints[field], field
        assert ast.literal_eval(found[field]["default"]) == defaults[field], field
    _, later = code_cells("03_train.ipynb")
    assert LAUNCH <= read_names(later) and "TrainConfig.field_names()" in "".join(later)


def test_the_pipeline_passes_only_parameters_the_notebooks_have():
    """What helpers.pipeline hands notebook 03 (the preset's training settings, each arm's
    overrides, the launch settings) are all parameters of it: papermill would only warn otherwise."""
    from helpers.pipeline import ARMS, settings, train_settings
    found = papermill.inspect_notebook(str(NOTEBOOKS / "03_train.ipynb"))
    for preset in ("demo", "smoke", "gpt2-owt"):
        passed = set(train_settings(settings(preset, {}), "data")) | {"parent", "n_layers", "init", "out_dir", "max_iters"}
        passed |= LAUNCH | {k for arm in ARMS.values() for k in arm}
        assert passed <= set(found), preset

"""The package's layers, read from the source with ast (nothing is imported): every import of a
helpers module sits at the top of its file and points down a floor (or along its own), so no
module can reach back up and no cycle can form. FLOORS is the layout the README draws."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "helpers"

# From the ground up. A module may import modules of its own floor or of any floor below.
FLOORS = [
    ("ground", ["helpers", "helpers.errors", "helpers.files", "helpers.records"]),
    ("models", ["helpers.head_loss", "helpers.model", "helpers.generic", "helpers.lora"]),
    ("formats", ["helpers.formats", "helpers.formats.families", "helpers.formats.gguf", "helpers.formats.hf",
                 "helpers.formats.torch_files", "helpers.formats.sources", "helpers.formats.weights"]),
    ("text", ["helpers.tokenizer", "helpers.data"]),
    ("checkpoint", ["helpers.export", "helpers.checkpoint"]),
    ("measures", ["helpers.measures"]),
    ("inherit", ["helpers.inherit"]),
    ("training", ["helpers.trackers", "helpers.config", "helpers.parallel", "helpers.stopping", "helpers.startup", "helpers.saving",
                  "helpers.train"]),
    ("evaluation", ["helpers.evaluate"]),
    ("figures", ["helpers.plots"]),
    ("pipeline", ["helpers.pipeline", "helpers.pipeline.settings", "helpers.pipeline.notebooks",
                  "helpers.pipeline.report", "helpers.pipeline.experiments", "helpers.pipeline.__main__"]),
]
FLOOR_OF = {m: i for i, (_, modules) in enumerate(FLOORS) for m in modules}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def helpers_imports(tree: ast.Module, known: set[str]):
    """(line, imported module, at the top of the file) for every import of a helpers module;
    `from helpers import x` names the submodule x where there is one."""
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "helpers"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "helpers":
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            yield node.lineno, name, id(node) in top


def graph() -> dict[str, set[str]]:
    trees = sources()
    return {m: {name for _, name, _ in helpers_imports(t, set(trees))} - {m} for m, t in trees.items()}


def test_every_module_has_a_floor():
    assert set(sources()) == set(FLOOR_OF), "add new modules to FLOORS (and to the README's layout)"


def test_no_helpers_import_inside_a_function():
    trees = sources()
    inside = [f"{m}:{line} imports {name}" for m, t in trees.items()
              for line, name, at_top in helpers_imports(t, set(trees)) if not at_top]
    assert inside == []


def test_every_import_points_down():
    up = [f"{m} ({FLOORS[FLOOR_OF[m]][0]}) imports {d} ({FLOORS[FLOOR_OF[d]][0]})"
          for m, deps in graph().items() for d in deps if FLOOR_OF[d] > FLOOR_OF[m]]
    assert up == []


def test_no_cycle():
    edges = graph()
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        if state.get(m) == "open":
            pytest.fail("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        state[m] = "open"
        for d in sorted(edges[m]):
            visit(d, path + [m])
        state[m] = "done"

    for m in sorted(edges):
        visit(m, [])


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The reader sees an import inside a function and an upward one (a check that finds nothing
    because it cannot see would pass too)."""
    tree = ast.parse("from helpers.errors import ConfigError\n\ndef f():\n    from helpers.train import train\n")
    found = list(helpers_imports(tree, {"helpers.errors", "helpers.train"}))
    assert found == [(1, "helpers.errors", True), (4, "helpers.train", False)]
    assert FLOOR_OF["helpers.train"] > FLOOR_OF["helpers.errors"]

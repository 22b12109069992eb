"""What the README documents works: every pipeline, training and papermill command it shows is
read out of the README itself and resolved by the code that would run it (settings, TrainConfig,
the notebooks' parameters), the settings it lists resolve in every preset, and a notebook command
runs through papermill's own command line at smoke size. The smoke pipeline itself runs in
test_pipeline.py."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import papermill
import pytest

from helpers.config import TrainConfig, parse_cli
from helpers.errors import ConfigError
from helpers.evaluate import task_list
from helpers.pipeline import ARMS, PRESETS, arm_names, settings, train_settings
from helpers.records import from_json_text
from test_notebooks import NOTEBOOKS

REPO = NOTEBOOKS.parent
README = (REPO / "README.md").read_text()


def commands(prefix: str) -> list[list[str]]:
    """Every command of the README that starts with `prefix`, in code spans or blocks (continuation
    lines joined), as its arguments after the prefix; placeholders such as [--out DIR] are skipped."""
    text = README.replace("\\\n", " ")
    found = []
    blocks = [ln for block in re.findall(r"```\w*\n(.*?)```", text, re.S) for ln in block.splitlines()]
    for line in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)) + blocks:
        line = line.strip().split(" # ")[0]
        line = re.sub(r"^!?(cd \S+ && )?([A-Z_]+=\S+ )*", "", line)  # a Kaggle cell's cd, environment variables
        if line.startswith(prefix) and "[" not in line.split("'")[0].replace("[0", ""):
            found.append(shlex.split(line)[len(shlex.split(prefix)):])
    return found


def arm_configs(s: dict) -> list[TrainConfig]:
    """The TrainConfig of each arm the pipeline would train with settings s (what notebook 03 builds)."""
    common = train_settings(s, "data")
    return [TrainConfig.from_dict({**common, "parent": "parent", "n_layers": s["n_layers"], **ARMS[arm],
                                   "out_dir": arm}) for arm in arm_names(s)]


def test_the_readme_shows_pipeline_train_and_papermill_commands():
    assert len(commands("python -m helpers.pipeline")) >= 3
    assert len(commands("python -m helpers.train")) >= 2
    assert len([c for c in commands("papermill") if c[0].startswith("notebooks/")]) >= 4


def test_every_documented_pipeline_command_resolves():
    for args in commands("python -m helpers.pipeline"):
        preset = args[args.index("--preset") + 1] if "--preset" in args else "demo"
        overrides = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("--"))
        s = settings(preset, overrides)
        assert arm_configs(s), args


DOCUMENTED_SETTINGS = [
    {"strategy": "first"}, {"strategy": "first+last"}, {"strategy": "block-influence"}, {"strategy": "angular"},
    {"layers": "0,1,2,29"}, {"copy": "all"}, {"copy": "paper"}, {"compare": "first,angular,scratch"},
    {"grow": "true"}, {"grow": "true", "grow_start": "2", "grow_step": "2", "grow_tolerance": "0"},
    {"recipe": "paper"}, {"launch_ddp": "true"}, {"weight_decay": "0.05"}, {"dtype": "float16"}, {"init": "resume"},
    {"compare": "child,child+lora,scratch"}, {"compare": "child,child+lora,scratch", "lora_r": "16"},
]


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("setting", DOCUMENTED_SETTINGS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_every_documented_setting_resolves_in_every_preset(preset, setting):
    s = settings(preset, setting)
    for cfg in arm_configs(s):
        assert cfg.layers is None or cfg.strategy == "first"


def test_explicit_layers_override_the_presets_strategy():
    """README: `layers=0,1,2,29` with the default preset (strategy block-influence, three arms)
    trains the child of exactly those blocks against scratch; notebook 02 keeps them."""
    import torch
    from helpers.inherit import chosen_layers
    from helpers.model import GPT, GPTConfig
    s = settings("demo", {"layers": "0,1,2,29"})
    assert (s["strategy"], s["layers"], s["n_layers"], s["compare"]) == ("first", [0, 1, 2, 29], 4, None)
    assert arm_names(s) == ["child", "scratch"]
    child, scratch = arm_configs(s)
    assert (child.init, child.layers, child.n_layers) == ("inherit", [0, 1, 2, 29], 4) and scratch.init == "scratch"
    torch.manual_seed(0)
    parent = GPT(GPTConfig(n_layer=30, n_head=1, n_embd=8, vocab_size=16, block_size=8))
    assert chosen_layers(parent, s["n_layers"], s["layers"], s["strategy"]) == ("layers", [0, 1, 2, 29])
    # arms beyond the strategies stay; the strategies become the one child
    more = settings("demo", {"layers": "[0, 29]", "compare": "first,angular,scratch,scratch+kd"})
    assert more["compare"] == "child,scratch,scratch+kd" and more["n_layers"] == 2
    assert settings("smoke", {"layers": "0,3", "n_layers": "2"})["n_layers"] == 2  # agreeing n_layers is fine


@pytest.mark.parametrize("extra, message", [
    ({"strategy": "angular"}, "give one of them, not both"),
    ({"n_layers": "3"}, "but layers lists 4 blocks"),
    ({"grow": "true"}, "grow=true picks the number of blocks itself"),
])
def test_explicit_layers_refuse_a_setting_that_contradicts_them(extra, message):
    with pytest.raises(ConfigError, match=message):
        settings("demo", {"layers": "0,1,2,29", **extra})


def test_every_documented_training_command_parses():
    for args in commands("python -m helpers.train"):
        if any(a.startswith("--config") for a in args):
            continue
        cfg = parse_cli([a for a in args if "=" in a])
        assert cfg.parent and cfg.max_iters


def test_every_documented_papermill_command_names_real_parameters():
    for args in commands("papermill"):
        if args[0] == "--help-notebook":
            assert (REPO / args[1]).is_file()
            continue
        found = papermill.inspect_notebook(str(REPO / args[0]))
        given = {args[i + 1]: args[i + 2] for i, a in enumerate(args) if a == "-p"}
        assert given and set(given) <= set(found), (args[0], given)
        if "models" in given:  # JSON text, as papermill -p passes it, read by notebook 04's helpers
            assert len(from_json_text(given["models"])) == 3 and len(task_list(given["tasks"])) == 5


def test_a_readme_notebook_command_runs_through_the_papermill_cli_and_streams(train_inputs, tmp_path):
    """The README's `papermill notebooks/02_inherit.ipynb out.ipynb -p parent ... -p n_layers ...`
    with a tiny parent, with --log-output and INHERITUNE_PROGRESS=text as the README says: the
    cells' output reaches the terminal while it runs, and a list parameter passed as text works."""
    import os
    env = {**os.environ, "INHERITUNE_PROGRESS": "text"}
    cmd = [sys.executable, "-m", "papermill", str(NOTEBOOKS / "02_inherit.ipynb"), str(tmp_path / "out.ipynb"),
           "-p", "parent", str(train_inputs / "parent.pt"), "-p", "layers", "0,3", "-p", "out", "child.pt",
           "-p", "max_new_tokens", "4", "--cwd", str(tmp_path), "--log-output"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    terminal = done.stdout + done.stderr
    assert done.returncode == 0, terminal[-2000:]
    assert "child: 2 blocks" in terminal and "saved the child to" in terminal
    side = json.loads((tmp_path / "child.json").read_text())
    assert side["provenance"]["layers"] == [0, 3]


def test_help_notebook_lists_every_parameter_with_its_type():
    """The README's `papermill --help-notebook notebooks/03_train.ipynb`: every TrainConfig field
    (kd_alpha included, which papermill's parser used to skip), none of "Unknown type"."""
    done = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(NOTEBOOKS / "03_train.ipynb")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    listed = {line.split(":")[0].strip() for line in done.stdout.splitlines() if re.match(r"  \w+: ", line)}
    assert set(TrainConfig.field_names()) <= listed
    assert "Unknown type" not in done.stdout and "Unable to parse" not in done.stdout + done.stderr


def test_layers_setting_runs_through_the_pipeline(plain_run):
    """`python -m helpers.pipeline --preset smoke parent=<folder> tokenizer=<folder> layers=0,1,3` (the
    README's layers setting at smoke size, tiny budget, a tiny Llama with Llama 2's SentencePiece
    tokenizer as the parent; conftest.plain_run): the child keeps exactly those blocks, trained
    against scratch."""
    from helpers.checkpoint import read_sidecar
    out = plain_run[1]
    assert read_sidecar(out / "child_init.pt")["provenance"]["layers"] == [0, 1, 3]
    assert read_sidecar(sorted((out / "child").glob("step_*.pt"))[-1])["provenance"]["layers"] == [0, 1, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert {r["model"] for r in summary["results"]} == {"parent", "child, inherited (untrained)",
                                                        "child, inherited + trained", "scratch, trained"}

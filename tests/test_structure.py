"""Imports run one way: CLI -> commands -> runner -> stages -> frame (`pipeline/`).

Read from the source with `ast`, every import counts, at module level or inside a function (a
function-local import still ties the modules together; hiding it there only defers the circle).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("saliency", "objects", "embed", "cluster", "pseudo_masks", "train")  # the method, in order


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, as dotted names (`from stages import cluster` gives `stages.cluster`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def modules_in(package: str) -> list[Path]:
    return sorted((ROOT / package).glob("*.py"))


def imports_stages(path: Path) -> list[str]:
    return sorted(m for m in imported_modules(path) if m == "stages" or m.startswith("stages."))


@pytest.mark.parametrize("path", [p for p in modules_in("pipeline") if p.stem != "runner"], ids=lambda p: p.stem)
def test_the_frame_knows_no_stage(path):
    """Only the runner, which holds the stage list and the composed config, imports stages."""
    assert imports_stages(path) == []


@pytest.mark.parametrize("path", modules_in("commands"), ids=lambda p: p.stem)
def test_commands_read_artifacts_through_the_frame(path):
    assert imports_stages(path) == []


@pytest.mark.parametrize("path", modules_in("stages"), ids=lambda p: p.stem)
def test_no_stage_imports_another(path):
    others = [m for m in imports_stages(path) if m not in ("stages", f"stages.{path.stem}")]
    assert others == []


def layer_of(module: str) -> int | None:
    """CLI 4 -> commands 3 -> runner 2 -> stages 1 -> frame 0; None for modules outside the project."""
    top = module.split(".")[0]
    if top == "pipeline":
        return 2 if module.startswith("pipeline.runner") else 0
    return {"stages": 1, "commands": 3, "run_pipeline": 4}.get(top)


@pytest.mark.parametrize("path", [*modules_in("pipeline"), *modules_in("stages"), *modules_in("commands"),
                                  ROOT / "run_pipeline.py"], ids=lambda p: f"{p.parent.name}.{p.stem}")
def test_imports_run_one_way(path):
    """No module imports one above it: the frame knows neither the runner nor the commands, the runner no command."""
    own = layer_of(f"{path.parent.name}.{path.stem}" if path.parent != ROOT else path.stem)
    above = sorted(m for m in imported_modules(path) if (layer_of(m) or 0) > own)
    assert above == []


def test_stages_holds_exactly_the_method():
    assert sorted(p.stem for p in modules_in("stages") if p.stem != "__init__") == sorted(STAGES)


def test_the_runner_runs_every_stage_in_order():
    from pipeline.runner import STAGE_NAMES

    assert STAGE_NAMES == STAGES

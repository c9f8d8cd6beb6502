"""dvc.yaml as the code needs it: a stage reruns when any module it runs changes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def _module_files(name: str) -> set[str]:
    """'pipeline.data.reader' -> pipeline/data/reader.py plus the `__init__.py` of every
    package on the way (Python runs them all); nothing for a name that is a symbol."""
    parts = name.split(".")
    files = {"/".join(parts[:i]) + "/__init__.py" for i in range(1, len(parts) + 1)}
    files.add("/".join(parts) + ".py")
    return {path for path in files if (REPO_ROOT / path).is_file()}


def _imported_files(path: Path) -> set[str]:
    """The pipeline/ files `path` imports anywhere in it (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {file for name in names if name.startswith("pipeline") for file in _module_files(name)}


def _runs(stage_script: str) -> set[str]:
    """Every pipeline/ file the stage script imports, directly or through other modules."""
    found: set[str] = set()
    pending = [stage_script]
    while pending:
        for file in _imported_files(REPO_ROOT / pending.pop()) - found:
            found.add(file)
            pending.append(file)
    return found


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_module_a_stage_runs_is_a_dependency(stage):
    deps = set(STAGES[stage]["deps"])
    script = f"stages/{stage}.py"
    assert script in deps and STAGES[stage]["cmd"] == f"python {script}"
    runs = _runs(script)
    assert {"pipeline/core/config.py", "pipeline/cli/stage.py"} <= runs  # the walk itself works
    missing = sorted(runs - deps)
    assert not missing, f"dvc.yaml: stage {stage} runs {missing} but does not list them in deps"
    stale = sorted(d for d in deps if d.startswith("pipeline/") and not (REPO_ROOT / d).is_file())
    assert not stale, f"dvc.yaml: stage {stage} lists {stale}, which do not exist"

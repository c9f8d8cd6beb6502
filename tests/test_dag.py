"""dvc.yaml as the code needs it: a stage reruns when any module it runs changes."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO_ROOT

from pipeline.core.provenance import code_files

STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def _runs(stage_script: str) -> set[str]:
    """Every pipeline/ file the stage script imports, directly or through other modules."""
    return code_files(REPO_ROOT, stage_script)


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

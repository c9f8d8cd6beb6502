"""The package layout holds: each layer imports only the layers below it (core <- data/models
<- metrics <- train/evaluate <- registry <- cli <- stages), no module imports itself back
through others, and each subpackage's docstring names every one of its modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "pipeline"
# What each subpackage may import (besides itself).
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "models": {"core"},
    "metrics": {"core", "data", "models"},
    "train": {"core", "data", "models", "metrics"},
    "evaluate": {"core", "data", "models", "metrics"},
    "registry": {"core", "data", "models"},
    "cli": {"core"},  # the sub-commands import the others late, inside their handlers
}
LATE_IMPORTS_OK = {"cli": {"registry", "train"}}  # sync-run uploads a train run


def _modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts): path
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported pipeline module or name, at module level?) for every import in `path`."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        found += [(name, id(node) in top_level) for name in names if name.startswith("pipeline.")]
    return found


def test_every_subpackage_says_what_it_is_for():
    for package in ALLOWED:
        init = PACKAGE / package / "__init__.py"
        docstring = ast.get_docstring(ast.parse(init.read_text()))
        # One summary line, then (test below) its modules.
        assert docstring and docstring.splitlines()[0].endswith((".", ":")), init


@pytest.mark.parametrize("module", sorted(_modules()))
def test_no_module_imports_a_higher_layer(module):
    own = module.split(".")[1] if module.count(".") >= 2 else None
    if own is None:  # pipeline/__init__.py, pipeline/__main__.py
        return
    for name, at_top in _imports(_modules()[module]):
        other = name.split(".")[1]
        allowed = ALLOWED[own] | {own} | (set() if at_top else LATE_IMPORTS_OK.get(own, set()))
        assert other in allowed, f"{module} imports {name}: {own} may not import {other}"


def test_no_import_cycles():
    modules = _modules()
    graph = {
        module: {
            target for name, _ in _imports(path)
            for target in (name, name.rsplit(".", 1)[0]) if target in modules
        }
        for module, path in modules.items()
    }
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in graph[module]:
            if state.get(target) == 1:
                raise AssertionError(" -> ".join([*trail, module, target]))
            if target not in state:
                visit(target, [*trail, module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_docstring_names_its_modules(package):
    """A newcomer finds a module from its package's docstring: each is named, as `module`."""
    init = PACKAGE / package / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    modules = sorted(path.stem for path in (PACKAGE / package).glob("*.py")
                     if path.stem != "__init__")
    assert [name for name in modules if f"`{name}`" not in doc] == []


GPU_MACHINE_LACKS = ("webdataset", "braceexpand", "torchmetrics", "ray", "mlflow", "dvc",
                     "pandas", "pyarrow")


def test_the_gpu_benchmark_and_tests_import_with_torch_and_the_gpu_wheelhouse():
    """`benchmarks/gpu.sh` runs on a machine with torch and numpy plus `make gpu-wheels`
    (pillow, pyyaml, fsspec, tqdm, pytest): what it imports must not need anything else."""
    import subprocess
    import sys

    blocker = (
        "import importlib.abc, sys\n"
        f"LACKS = {GPU_MACHINE_LACKS!r}\n"
        "class Lacks(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in LACKS:\n"
        "            raise ImportError(f'{name} is not on the GPU machine')\n"
        "sys.meta_path.insert(0, Lacks())\n"
        "sys.path[:0] = ['.', 'tests']\n"
        "import conftest, test_gpu, benchmarks.gpu\n"
    )
    result = subprocess.run([sys.executable, "-c", blocker], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_each_stage_runs_run_of_the_module_named_after_it():
    """A stage name leads to its code: `stages/X.py` calls `run(cfg, layout)` of
    `pipeline/<package>/X.py`, and that function exists there."""
    import yaml

    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    for stage in stages:
        shell = ast.parse((REPO_ROOT / "stages" / f"{stage}.py").read_text())
        imported = {(node.module, alias.name) for node in ast.walk(shell)
                    if isinstance(node, ast.ImportFrom) for alias in node.names}
        [package] = [module.split(".")[1] for module, name in imported
                     if name == stage and module.startswith("pipeline.")]
        module = ast.parse((PACKAGE / package / f"{stage}.py").read_text())
        runs = [node for node in module.body
                if isinstance(node, ast.FunctionDef) and node.name == "run"]
        assert [arg.arg for arg in runs[0].args.args] == ["cfg", "layout"], stage
        assert f"{stage}.run(cfg, layout)" in ast.unparse(shell), stage

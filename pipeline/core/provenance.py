"""Where a run comes from: the user, the git commit, the DVC experiment; as MLflow tags.

Every stage command of a DVC experiment (`dvc exp run`, queued or --temp too) gets
`DVC_EXP_NAME` and `DVC_EXP_BASELINE_REV` (DVC 3.67); the runs it creates are tagged with them,
so that `dvc exp show` and the MLflow UI name an experiment the same way. (Where the stores of
an experiment's temporary copy go: `pipeline.core.layout.workspace_root`.)
"""

from __future__ import annotations

import contextlib
import getpass
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

# Set by DVC for every stage command of an experiment (dvc/repo/experiments/queue/base.py).
DVC_EXP_NAME_ENV = "DVC_EXP_NAME"
DVC_EXP_BASELINE_REV_ENV = "DVC_EXP_BASELINE_REV"

# MLflow's own tag names (mlflow.utils.mlflow_tags): "Created by", "Source" and the commit
# beside it in the UI.
TAG_USER = "mlflow.user"
TAG_SOURCE_NAME = "mlflow.source.name"
TAG_SOURCE_TYPE = "mlflow.source.type"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_GIT_BRANCH = "mlflow.source.git.branch"
TAG_GIT_REPO_URL = "mlflow.source.git.repoURL"
# Ours: the DVC experiment a run belongs to (`dvc exp show` names it the same way).
TAG_DVC_EXP_NAME = "dvc.exp_name"
TAG_DVC_BASELINE_REV = "dvc.baseline_rev"


@dataclass(frozen=True)
class DvcExperiment:
    """The DVC experiment a stage runs for (`dvc exp run`, queued, --temp)."""

    name: str
    baseline_rev: str

    def tags(self) -> dict[str, str]:
        """The run tags that name it."""
        return {TAG_DVC_EXP_NAME: self.name, TAG_DVC_BASELINE_REV: self.baseline_rev}


def dvc_experiment(env: Mapping[str, str] | None = None) -> DvcExperiment | None:
    """The experiment DVC is running, from its environment; None under `dvc repro` or by hand."""
    env = os.environ if env is None else env
    name = env.get(DVC_EXP_NAME_ENV)
    if not name:
        return None
    return DvcExperiment(name=name, baseline_rev=env.get(DVC_EXP_BASELINE_REV_ENV, ""))


def _git(cwd: Path, *args: str) -> str | None:
    """`git ARGS` in `cwd`: its stripped output, or None where git or the checkout is missing."""
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                                check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def git_commit(cwd: Path) -> str | None:
    """The checked-out commit, or None outside a git checkout (e.g. a Ray cluster image)."""
    return _git(cwd, "rev-parse", "HEAD")


def committed_text(cwd: Path, relative_path: str) -> str | None:
    """The text of `relative_path` as committed at HEAD, or None (no git, not committed)."""
    return _git(cwd, "show", f"HEAD:{relative_path}")


def source_tags(root: Path, script: str) -> dict[str, str]:
    """MLflow's source tags for a stage `script` run from `root`: who, what, which commit."""
    tags = {TAG_SOURCE_NAME: script, TAG_SOURCE_TYPE: "LOCAL"}
    with contextlib.suppress(KeyError, OSError):  # no passwd entry for the uid (containers)
        tags[TAG_USER] = getpass.getuser()
    commit = git_commit(root)
    if commit:
        tags[TAG_GIT_COMMIT] = commit
        # A DVC experiment copy checks out a detached HEAD: no branch to name then.
        branch = _git(root, "symbolic-ref", "--short", "-q", "HEAD")
        if branch:
            tags[TAG_GIT_BRANCH] = branch
        remote = shareable_url(_git(root, "remote", "get-url", "origin"))
        if remote:
            tags[TAG_GIT_REPO_URL] = remote
    return tags


def shareable_url(url: str | None) -> str | None:
    """A remote's URL fit for a tag: credentials removed; None for a local path (a DVC
    experiment copy's origin is the workspace folder, which links nowhere)."""
    if not url or url.startswith(("/", ".", "file:")):
        return None
    parsed = urlsplit(url)
    if not parsed.scheme or not parsed.hostname:
        return url  # scp-like `git@host:org/repo`: a user name, no secret
    host = parsed.hostname + (f":{parsed.port}" if parsed.port else "")
    return urlunsplit((parsed.scheme, host, parsed.path, "", ""))


# --- the code a stage runs ------------------------------------------------------------------------


def _module_files(root: Path, name: str) -> set[str]:
    """'pipeline.data.reader' -> pipeline/data/reader.py plus the `__init__.py` of every
    package on the way (Python runs them all); nothing for a name that is a symbol."""
    parts = name.split(".")
    files = {"/".join(parts[:i]) + "/__init__.py" for i in range(1, len(parts) + 1)}
    files.add("/".join(parts) + ".py")
    return {path for path in files if (root / path).is_file()}


def _imported_files(root: Path, relative: str, package: str) -> set[str]:
    """The `package` files that `root/relative` imports anywhere in it (function-level too)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse((root / relative).read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {file for name in names if name.split(".")[0] == package
            for file in _module_files(root, name)}


def code_files(root: Path, script: str, package: str = "pipeline") -> set[str]:
    """Every `package` file (relative to `root`) that `script` imports, directly or through
    other modules: the code a stage runs (dvc.yaml must list them; tests/test_dag.py)."""
    found: set[str] = set()
    pending = [script]
    while pending:
        for file in _imported_files(root, pending.pop(), package) - found:
            found.add(file)
            pending.append(file)
    return found

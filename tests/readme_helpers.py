"""What the README promises, read from the README itself: its tested command blocks (a fenced
block after `<!-- tested: NAME ... -->`) and the messages of its troubleshooting table."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"


def readme_block(name: str) -> str:
    """The shell commands of the README block marked `<!-- tested: NAME ... -->`."""
    pattern = rf"<!-- tested: {re.escape(name)}\b[^>]*-->\s*```bash\n(.*?)```"
    match = re.search(pattern, README.read_text(), re.DOTALL)
    assert match, f"README.md has no block marked `<!-- tested: {name} -->`"
    return match.group(1)


def run_block(script: str, cwd: Path, env: dict[str, str],
              timeout_s: float = 900) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """Run README commands as a user's bash would (`set -euo pipefail`, one shell); returns
    the result and the shell's environment afterwards (what `source` and `export` left), so
    that the next block continues in the same shell."""
    with tempfile.TemporaryDirectory() as scratch:
        env_file = Path(scratch) / "env"
        wrapped = f"set -euo pipefail\n{script}\nenv -0 > {env_file}\n"
        result = subprocess.run(["bash", "-c", wrapped], cwd=cwd, env=env, capture_output=True,
                                text=True, timeout=timeout_s)
        after = dict(env)
        if env_file.exists():
            after = dict(item.split("=", 1) for item in env_file.read_text().split("\0") if item)
    return result, after


def _pattern(message: str) -> re.Pattern[str]:
    """A table message as a regex: `...` and `<placeholder>` stand for any text."""
    parts = re.split(r"(\.\.\.|<[^<>]+>)", message)
    return re.compile("".join(".*?" if i % 2 else re.escape(part)
                              for i, part in enumerate(parts)))


def troubleshooting_messages() -> list[re.Pattern[str]]:
    """Every message (code span) in the first column of the README's troubleshooting table."""
    text = README.read_text()
    table = text[text.index("## Troubleshooting"):]
    rows = [line for line in table.splitlines() if line.startswith("| ")][2:]  # no header
    cells = [row.split(" | ")[0].removeprefix("| ") for row in rows]
    spans = [double or single for cell in cells
             for double, single in re.findall(r"``\s?(.+?)\s?``|`([^`]+)`", cell)]
    return [_pattern(span) for span in spans]


def assert_in_troubleshooting(line: str) -> None:
    """`line` (what a user saw) is a message of the troubleshooting table."""
    shown = line.removeprefix("error: ").strip()
    assert any(pattern.fullmatch(shown) for pattern in troubleshooting_messages()), (
        f"README troubleshooting has no row for what the user sees:\n{shown}"
    )


def without(env: dict[str, str], *names: str) -> dict[str, str]:
    """`env` without `names`."""
    return {key: value for key, value in env.items() if key not in names}


def clean_home(tmp: Path) -> str:
    """A HOME with no ~/.ray/auth_token (the real one may hold another cluster's token)."""
    home = tmp / "home"
    (home / ".ray").mkdir(parents=True, exist_ok=True)
    return str(home)

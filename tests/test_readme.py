"""README's code blocks: each one that can run offline in a test runs here; the others are named with why not."""

import re
import subprocess
import sys

from tests.conftest import REPO

# commands the tests cannot run, and why: each must still be in README (so that this list cannot go stale)
SKIPPED = {
    "make run": "the whole pipeline on the embedded benchmark (about 5 minutes); CI's clean clone runs its stages",
    "make test": "the test suite itself",
}


def _blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block that names a language."""
    return re.findall(r"```(bash|python)\n(.*?)```", text, flags=re.DOTALL)


def test_every_readme_command_runs_or_is_named_as_skipped(tmp_path):
    blocks = _blocks((REPO / "README.md").read_text())
    commands = [
        line.split("#")[0].strip() for language, code in blocks if language == "bash" for line in code.splitlines()
    ]
    assert set(SKIPPED) <= set(commands), "a skipped command is no longer in README: drop it from SKIPPED"
    for language, code in blocks:
        if language == "python":
            done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
    runnable = [c for c in commands if c and c not in SKIPPED]
    for command in runnable:
        done = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}: {done.stderr}"

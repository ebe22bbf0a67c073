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


def _table(text: str, header_start: str) -> dict[str, dict[str, str]]:
    """The Markdown table whose header row starts with `header_start`: per row, its first cell's first word ->
    {column: cell}, with bold marks dropped and the minus sign written as '-'."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))

    def cells(line: str) -> list[str]:
        return [cell.strip().replace("**", "").replace("−", "-") for cell in line.strip("|").split("|")]

    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows[cells(line)[0].split()[0]] = dict(zip(cells(lines[start]), cells(line), strict=True))
    return rows


def test_readme_suite_table_is_docs_suite_figures():
    """README's suite table is a digest of docs/suite.md (which scripts/suite_table.py writes): each figure is
    the one there, so that regenerating the suite cannot leave README behind unnoticed."""
    readme = _table((REPO / "README.md").read_text(), "| suite case |")
    suite = (REPO / "docs" / "suite.md").read_text()
    gains, effects = _table(suite, "| case | seeds |"), _table(suite, "| case | composition: Transfer |")
    assert readme, "README has no suite table"
    for case, row in readme.items():
        calibration = effects[case]["calibration: Transfer"]
        assert row["composition's own effect on Transfer"] == effects[case]["composition: Transfer"], case
        assert row["on new names"] == effects[case]["composition: new names"], case
        assert row["calibration"] == ("+0.0" if calibration == "+0.0 ± 0.0" else calibration), case
        assert row["MoDER - zero-shot Last"] == gains[case]["Last"], case

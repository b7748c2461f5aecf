"""The worked EPLB examples of docs/eplb.md and the README produce exactly the output they show (timings aside)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from engine.errors import run_cli
from eplb.cli import main

DOC = Path(__file__).resolve().parents[2] / "docs" / "eplb.md"
README = Path(__file__).resolve().parents[2] / "README.md"


def block_after(marker: str, text: str, start: int = 0) -> tuple[str, int]:
    """The fenced block that follows `marker` (from `start`): (its body, the offset after it)."""
    at = text.index(marker, start)
    match = re.compile(r"```[a-z]*\n(.*?)```", re.DOTALL).search(text, at)
    assert match, marker
    return match.group(1), match.end()


def mask_time(text: str) -> str:
    text = re.sub(r"planned in \d+\.\d+ s", "planned in <t> s", text)
    return re.sub(r'"seconds": [0-9.e-]+', '"seconds": <t>', text)


@pytest.mark.parametrize("page", [DOC, README], ids=["docs-eplb", "readme"])
def test_api_example(page):
    doc = page.read_text()
    code, end = block_after("<!-- example: api -->", doc)
    expected, _ = block_after("```text", doc, end - 3)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(page), "exec"), {})  # noqa: S102 (the page's own example)
    assert out.getvalue() == expected


def test_cli_example(tmp_path, monkeypatch, capsys):
    session, _ = block_after("<!-- example: cli -->", DOC.read_text())
    monkeypatch.chdir(tmp_path)
    steps = re.split(r"^\$ ", session, flags=re.MULTILINE)[1:]  # each: "command\noutput..."
    assert len(steps) == 3
    for step in steps:
        command, _, expected = step.partition("\n")
        argv = shlex.split(command)
        if argv[0] == "cat":
            Path(argv[1]).write_text(expected)
            continue
        assert argv[:3] == ["python", "-m", "eplb"]
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main, argv[3:])
        assert exit_info.value.code == 0
        assert mask_time(capsys.readouterr().out) == mask_time(expected), command

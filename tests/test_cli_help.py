"""The ``laplace-hfl`` CLI explains itself: quiet imports, one summary line per
command, stated defaults, headed listings."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from laplace_hfl.bench.cli import main


def test_help_does_not_import_torch():
    """``laplace-hfl --help`` answers from the launcher alone: no torch, no
    laplace-torch (their imports take seconds to tens of seconds)."""
    code = (
        "import sys, laplace_hfl_cli\n"
        "try:\n    laplace_hfl_cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'laplace', 'laplace_hfl') if m in sys.modules))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert "compare" in res.stdout and "benchmark" in res.stdout
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_launcher_help_matches_the_full_parser(capsys):
    import laplace_hfl_cli
    from laplace_hfl.bench.cli import build_parser

    with pytest.raises(SystemExit):
        laplace_hfl_cli.main(["--help"])
    assert capsys.readouterr().out == build_parser().format_help()


def test_help_in_fresh_interpreter_has_no_warning_and_one_line_per_command():
    res = subprocess.run(
        [sys.executable, "-m", "laplace_hfl_cli", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0
    assert "Warning" not in res.stderr, res.stderr
    for name in ("compare", "benchmark"):
        # name and summary on the same line
        assert re.search(rf"^\s+{name}\s+\S", res.stdout, re.M), res.stdout


@pytest.mark.parametrize(
    ("command", "default"),
    [
        ("compare", "(default: results/compare)"),
        ("benchmark", "(default: benchmarks/results; benchmarks/results/quick with"),
    ],
)
def test_subcommand_help_states_out_default_without_rest_markup(
    capsys, command, default
):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert default in out
    assert "``" not in out


def test_compare_list_has_column_headers(capsys):
    assert main(["compare", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    heads = [ln.split() for ln in lines]
    assert ["task", "description"] in heads
    assert ["method", "family", "backend", "structure"] in heads
    i = heads.index(["method", "family", "backend", "structure"])
    assert set(lines[i + 1].replace(" ", "")) == {"-"}
    assert lines[i + 2].split()[:2] == ["map", "map"]


def test_no_progress_silences_hfl_automatic_bars(tmp_path, capsys, monkeypatch):
    import laplace_hfl.engine.progress as hp

    monkeypatch.setattr(hp, "AUTO_PROGRESS_AFTER_S", 0.0)
    args = ["compare", "--task", "tiny", "--methods", "map", "--out", str(tmp_path),
            "--no-figures"]  # fmt: skip
    assert main(args) == 0
    assert hp.AUTO_PROGRESS_AFTER_S == 0.0  # bars stay on without the flag
    assert main([*args, "--no-progress"]) == 0
    capsys.readouterr()
    for _ in hp.progress(range(3), desc="[HFL predict]"):
        pass
    assert capsys.readouterr().err == ""

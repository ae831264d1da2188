"""The command line: every subcommand is registered and documents itself; bad input is one line."""

from __future__ import annotations

import pytest

from skipgpt.cli.main import COMMANDS, build_parser, main


def test_every_command_has_help(capsys):
    parser = build_parser()
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: skipgpt " + name)
        assert len(out.splitlines()) > 3


def test_bad_input_is_one_line_error(tmp_path, capsys):
    code = main(["info", "--model", str(tmp_path / "nowhere.gguf")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("skipgpt info: error:") and "does not exist" in err
    assert len(err.splitlines()) == 1

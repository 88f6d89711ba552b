"""Helpers shared by the CLI tests."""

from solution import common


def one_error_line(capsys, monkeypatch, main, argv):
    """Run a CLI's ``main`` as its shell wrapper does; return (exit code, the single ``error:`` line)."""
    monkeypatch.setattr(common, "setup_logging", lambda *a: None)  # caplog has the log; stderr: the error alone
    capsys.readouterr()
    code = common.run_cli(main, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    return code, lines[0]

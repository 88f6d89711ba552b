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


def snapshot(*folders, locks: bool = True) -> dict:
    """Every file under ``folders`` -> its bytes; of a lock file only that it is there (``locks=False``: not even)."""
    files = [p for d in folders if d.exists() for p in sorted(d.rglob("*")) if p.is_file()]
    return {
        p: b"" if p.name.endswith(".lock") else p.read_bytes() for p in files if locks or not p.name.endswith(".lock")
    }


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's own reader of the event files in ``folder``: each scalar tag's (step, value) in order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder)).Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

"""The ``quantsave`` command line."""

from __future__ import annotations

import subprocess
import sys

from quantsave.cli import main


def test_demo_runs_and_reports(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "tiny"
    assert main(["demo", "--out", str(out), "--max-shard-size", "500KB"]) == 0
    text = capsys.readouterr().out
    assert "outputs match" in text and "yes" in text
    assert (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1


def test_console_script_help() -> None:
    done = subprocess.run([sys.executable, "-m", "quantsave", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "demo" in done.stdout


def test_bad_usage_exit_code() -> None:
    done = subprocess.run([sys.executable, "-m", "quantsave", "nope"], capture_output=True, text=True)
    assert done.returncode == 2


def test_bad_input_is_one_line_error(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["demo", "--max-shard-size", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quantsave: error:") and "invalid size" in err and "Traceback" not in err

"""`twotower serve` when Ray cannot be reached: a clear message and a non-zero exit, never an endless
retry. The deadline mechanism runs in a child process (it ends the process when the deadline passes)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time

cli = importlib.import_module("twotower.cluster.cli.main")  # the package's `main` attribute is the function


def test_a_connect_that_hangs_ends_with_a_message_at_the_deadline():
    code = ("import time; from twotower.cluster.cli.main import _within; "
            "_within(1.0, 'Ray at 10.0.0.1:6379', lambda: time.sleep(60))")  # fmt: skip
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and time.monotonic() - t0 < 20
    assert "could not reach Ray at 10.0.0.1:6379 within 1 s" in out.stderr


def test_a_connect_error_is_a_message_and_status_1(monkeypatch, capsys):
    def refuse(address, port):
        raise ConnectionError(f"Failed to connect to Ray cluster at {address}")

    monkeypatch.setattr(cli, "_connect_ray", refuse)
    assert cli.main(["serve", "--address", "10.0.0.1:6379"]) == 1
    assert "error: Failed to connect to Ray cluster at 10.0.0.1:6379" in capsys.readouterr().err

"""`twotower serve` when Ray cannot be reached: a clear message and a non-zero exit, never an endless
retry. The deadline mechanism runs in a child process (it ends the process when the deadline passes)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time

import pytest

cli = importlib.import_module("twotower.cluster.cli.main")  # the package's `main` attribute is the function
serving = importlib.import_module("twotower.cluster.cli.serving")


def test_a_connect_that_hangs_ends_with_a_message_at_the_deadline():
    code = ("import time; from twotower.cluster.cli.serving import within; "
            "within(1.0, 'Ray at 10.0.0.1:6379', lambda: time.sleep(60))")  # fmt: skip
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and time.monotonic() - t0 < 20
    assert "could not reach Ray at 10.0.0.1:6379 within 1 s" in out.stderr


def test_a_connect_error_is_a_message_and_status_1(monkeypatch, capsys):
    def refuse(address, cfg, port):
        raise ConnectionError(f"Failed to connect to Ray cluster at {address}")

    monkeypatch.setattr(serving, "connect_ray", refuse)
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--address", "10.0.0.1:6379"])
    assert e.value.code == 1
    assert "error: Failed to connect to Ray cluster at 10.0.0.1:6379" in capsys.readouterr().err


def _error(capsys, argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code, capsys.readouterr().err


def test_common_mistakes_are_one_line_errors(capsys, tmp_path):
    code, err = _error(capsys, ["generate", "x", "--model", str(tmp_path / "nope")])
    assert code == 2 and err.strip() == f"error: model: no config.json in {tmp_path / 'nope'}"
    import torch

    if not torch.cuda.is_available():
        code, err = _error(capsys, ["generate", "x", "--device", "cuda"])
        assert code == 2 and "--device cuda: this machine has no CUDA device" in err and "Traceback" not in err
    code, err = _error(capsys, ["scale", "--dashboard", "http://127.0.0.1:1", "--replicas", "2"])
    assert code == 1 and "cannot reach the Ray dashboard at http://127.0.0.1:1" in err
    code, err = _error(capsys, ["serve", "--http-port", "0"])  # checked before any Ray starts
    assert code == 2 and "http_port: must be a TCP port" in err
    code, err = _error(capsys, ["serve", "--http-port", "8100", "--grpc-port", "8100"])
    assert code == 2 and "grpc_port: must differ from http_port" in err


def test_a_busy_port_is_named_before_ray_starts(capsys, monkeypatch):
    import socket

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code, err = _error(capsys, ["serve", "--http-port", str(port)])
    assert code == 1 and f"port {port} (--http-port) is in use" in err


def test_help_shows_defaults_and_version(capsys):
    from twotower.cluster.engine.version import version

    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"twotower {version()}"
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for needle in ("(default: 8000)", "(default: 9000)", "(default: 8080)", "(default: 127.0.0.1)"):
        assert needle in out, needle
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: diffusion)" in out and "(default: 0.8)" in out and "(default: None)" not in out


def test_flags_override_the_config_file(tmp_path):
    cfg_file = tmp_path / "serve.json"
    cfg_file.write_text('{"http_port": 8001, "engine": {"max_num_seqs": 8}}')
    parser = __import__("argparse").ArgumentParser()
    serving.add_serve_args(parser)
    a = parser.parse_args(["--config", str(cfg_file), "--grpc-port", "9100", "--max-model-len", "1024", "--eager",
                           "--served-model-name", "tiny", "--host", "0.0.0.0",
                           "--prefix-cache-bytes", "4096"])  # fmt: skip
    cfg = serving.serve_config(a)
    assert (cfg.engine.prefix_cache, cfg.engine.prefix_cache_bytes) == (True, 4096)
    assert not serving.serve_config(parser.parse_args(["--no-prefix-cache"])).engine.prefix_cache
    assert (cfg.http_port, cfg.grpc_port, cfg.host, cfg.served_model_name) == (8001, 9100, "0.0.0.0", "tiny")
    assert (cfg.engine.max_model_len, cfg.engine.max_num_seqs, cfg.engine.eager) == (1024, 8, True)
    assert cfg.model.endswith("twotower-tiny")  # the bundled model, as an absolute path every node can read


def test_throughput_line_from_two_scrapes():
    from twotower.cluster.cli.throughput import ThroughputLine
    from twotower.cluster.serve.metrics_scrape import totals

    def exposition(tokens: float, requests: float, tpf_sum: float, running: float) -> str:
        return (f'ray_twotower_generated_tokens_total{{model="m",NodeAddress="a"}} {tokens / 2}\n'
                f'ray_twotower_generated_tokens_total{{model="m",NodeAddress="b"}} {tokens / 2}\n'
                f'ray_twotower_tokens_per_forward_sum{{model="m"}} {tpf_sum}\n'
                f'ray_twotower_tokens_per_forward_count{{model="m"}} {requests}\n'
                f'ray_twotower_active_requests{{model="m",WorkerId="x y"}} {running}\n'
                f"# TYPE ray_twotower_queue_depth gauge\nray_twotower_queue_depth 1\n")  # fmt: skip

    line = ThroughputLine()
    assert line.update(totals(exposition(0, 0, 0, 0)), 0.0, 1) is None  # the first scrape: no interval yet
    text = line.update(totals(exposition(500, 4, 8.0, 3)), 10.0, 2)
    assert text == ("throughput: 50.0 tokens/s, running 3, waiting 1, tokens/forward 2.00 (denoiser -, context -), "
                    "tower pairs 2")  # fmt: skip
    idle = exposition(500, 4, 8.0, 0).replace("queue_depth 1", "queue_depth 0")
    assert line.update(totals(idle), 20.0, 2).startswith("throughput: 0.0 tokens/s, running 0, waiting 0")
    assert line.update(totals(idle), 30.0, 2) is None  # idle again: nothing more

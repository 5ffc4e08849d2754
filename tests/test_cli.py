"""The gemma4-nb command, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "gemma4_nb", *args], capture_output=True, text=True, timeout=300)


def test_generate_streams_and_reports_usage(tiny_dir):
    res = run("generate", "--model", str(tiny_dir), "--temperature", "0", "--max-new-tokens", "12", "Explain GQA")
    assert res.returncode == 0, res.stderr
    assert "prompt tokens:" in res.stderr and "generated tokens:" in res.stderr
    assert "prefill:" in res.stderr and "decode:" in res.stderr and "tok/s" in res.stderr


def test_errors_are_one_line_without_traceback(tmp_path):
    res = run("generate", "--model", str(tmp_path), "hello")
    assert res.returncode == 2
    assert "no config.json" in res.stderr
    assert "Traceback" not in res.stderr


def test_tiny_checkpoint_command_makes_a_loadable_model(tmp_path):
    res = run("tiny", str(tmp_path / "tiny"))
    assert res.returncode == 0, res.stderr
    res = run("generate", "--model", str(tmp_path / "tiny"), "--raw", "--max-new-tokens", "5", "--seed", "1", "import pandas")
    assert res.returncode == 0, res.stderr
    assert "generated tokens: 5" in res.stderr or "finish: eos" in res.stderr

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


def test_bench_command_reports_speed_and_memory(tiny_dir):
    res = run("bench", "--model", str(tiny_dir), "--quant", "int8", "--prompt", "8", "--decode", "4", "--threads", "1")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "weights: int8" in out and "threads: 1" in out
    row = next(line for line in out.splitlines() if line.startswith("gemma4-nb"))
    depth, prompt, ttft, prefill, decode, peak = row.split()[1:7]
    assert (depth, prompt) == ("0", "8") and float(prefill) > 0 and float(decode) > 0 and float(peak) > 0
    assert "bytes read per decode token" in out and "KV cache: fp32" in out


def test_bench_command_with_an_int8_kv_cache(tiny_dir):
    """``--kv int8`` decodes on an int8 cache and counts its bytes: a byte a value and a scale a row."""
    kv_gb = {}
    for kv in ("fp32", "int8"):
        res = run("bench", "--model", str(tiny_dir), "--quant", "int8", "--prompt", "8", "--decode", "4", "--threads",
                  "1", *(["--kv", kv] if kv == "int8" else []))
        assert res.returncode == 0, res.stderr
        assert f"KV cache: {kv}" in res.stdout
        kv_gb[kv] = float(res.stdout.split("GB + KV ")[1].split()[0])
    assert 0 < kv_gb["int8"] < 0.5 * kv_gb["fp32"]


def test_bench_command_rejects_bad_input(tiny_dir):
    res = run("bench", "--model", str(tiny_dir), "--shape", "gemma4-12b")
    assert res.returncode == 2 and "not both" in res.stderr
    res = run("bench", "--model", str(tiny_dir), "--compare", "llama.cpp", "--prompt", "4", "--decode", "1")
    assert res.returncode != 0 and "needs a GGUF model" in res.stderr


def test_bench_completion_measures_the_completers_latency(tiny_dir):
    """``gemma4-nb bench --completion``: completions by the notebook's completer as a user typing
    asks for them; the first request (with the load), then the median and slowest of the rest."""
    import json

    res = run("bench", "--completion", "--model", str(tiny_dir), "--requests", "3", "--max-new-tokens", "4",
              "--threads", "1")
    assert res.returncode == 0, res.stderr
    summary, figures = res.stdout.strip().splitlines()[-2:]
    assert summary.startswith("inline completion, 4 tokens, 1 threads: first request")
    r = json.loads(figures)
    assert r["requests"] == 3 and r["threads"] == 1 and r["max_new_tokens"] == 4
    assert len(r["generated_tokens"]) == 2 and all(0 < n <= 4 for n in r["generated_tokens"])
    assert 0 < r["median_s"] <= r["max_s"] and r["first_s"] > 0
    res = run("bench", "--completion", "--model", str(tiny_dir), "--requests", "1")
    assert res.returncode == 2 and "--requests must be at least 2" in res.stderr
    res = run("bench", "--completion", "--shape", "gemma4-12b")
    assert res.returncode == 2 and "not --shape" in res.stderr

"""The command line as a user runs it: a separate process, real files."""

import os
import subprocess
import sys

import pytest


def _mlapipe(*args, cache, timeout=300):
    env = dict(os.environ, MLAPIPE_CACHE=str(cache))
    return subprocess.run(
        [sys.executable, "-m", "mlapipe.runtime.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_demo_generate_builds_caches_and_streams(cache):
    done = _mlapipe("generate", "--demo", "-p", "Hello, world", "-n", "12", cache=cache)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Hello, world")
    assert "[12 tokens" in done.stderr
    assert len(list(cache.glob("*.gguf"))) == 1
    again = _mlapipe("generate", "--demo", "-p", "Hello, world", "-n", "12", cache=cache)
    assert again.stdout == done.stdout  # greedy, same cached model


def test_seeded_sampling_is_reproducible(cache):
    args = (
        "generate",
        "--demo",
        "-p",
        "The quick",
        "-n",
        "10",
        "--temp",
        "0.9",
        "--top-k",
        "40",
        "--top-p",
        "0.9",
    )
    first = _mlapipe(*args, "--seed", "5", cache=cache)
    second = _mlapipe(*args, "--seed", "5", cache=cache)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


def test_inspect_prints_config_types_params_and_kv_bytes(cache):
    _mlapipe("generate", "--demo", "-p", "x", "-n", "1", cache=cache)
    model = next(cache.glob("*.gguf"))
    done = _mlapipe("inspect", "-m", str(model), cache=cache)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "kv_lora_rank               32" in out
    assert "gating                     sigmoid" in out
    assert "F32" in out and "parameters:" in out
    # 4 layers x (32 + 16) latent numbers x 2 bytes
    assert "latent KV per token (bf16/f16): 384 bytes" in out

"""The command line as a user runs it: a separate process, real files."""

import os
import pathlib
import re
import subprocess
import sys
import unicodedata

import pytest
import tomllib


def _mlapipe(*args, cache, timeout=300):
    env = dict(os.environ, MLAPIPE_CACHE=str(cache))
    return subprocess.run(
        [sys.executable, "-m", "mlapipe.runtime.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _demo_tokenizer(cache):
    from mlapipe.runtime.gguf_model import GGUFModel
    from mlapipe.runtime.tokenizer import GGUFTokenizer

    return GGUFTokenizer(GGUFModel(next(cache.glob("*.gguf"))).metadata)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_demo_generate_builds_caches_and_streams(cache):
    done = _mlapipe("generate", "--demo", "-p", "Hello, world", "-n", "12", cache=cache)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Hello, world")
    summary = re.search(
        r"\[12 tokens, finish: length \(12 tokens asked\); prompt (\d+) tokens, "
        r"time to first token ([\d.]+) s, ([\d.]+) tokens/s; model .*demo.*\.gguf\]",
        done.stderr,
    )
    assert summary, done.stderr
    assert int(summary[1]) == len(_demo_tokenizer(cache).encode("Hello, world"))  # BOS included
    assert float(summary[2]) > 0 and float(summary[3]) > 0
    assert len(list(cache.glob("*.gguf"))) == 1
    again = _mlapipe("generate", "--demo", "-p", "Hello, world", "-n", "12", cache=cache)
    assert again.stdout == done.stdout  # greedy, same cached model


def test_generated_control_bytes_are_escaped_on_the_terminal_only(cache):
    """The demo's random text holds control characters: the API returns them, the CLI shows escapes."""
    from mlapipe.runtime import Engine, SamplingParams
    from mlapipe.runtime.display import printable

    done = _mlapipe("generate", "--demo", "-p", "Hello", "-n", "24", cache=cache)
    assert done.returncode == 0, done.stderr
    with Engine(next(cache.glob("*.gguf"))) as engine:
        text = engine.generate("Hello", SamplingParams(max_tokens=24))[0].text
    controls = {c for c in text if unicodedata.category(c) == "Cc" and c not in "\n\t"}
    assert controls, "the demo's greedy text from 'Hello' was expected to hold control characters"
    shown = done.stdout[len("Hello") :]
    assert shown == printable(text)
    assert not {c for c in shown if unicodedata.category(c)[0] == "C" and c not in "\n\t"}
    assert all(c.encode("unicode_escape").decode() in shown for c in controls)  # e.g. \x0b


def test_generate_says_when_the_context_is_full(cache):
    done = _mlapipe("generate", "--demo", "-p", "Hello", "-c", "24", cache=cache)  # -n: what fits
    assert done.returncode == 0, done.stderr
    generated = 24 - len(_demo_tokenizer(cache).encode("Hello"))  # the prompt and its tokens fill n_ctx
    assert f"[{generated} tokens, finish: length (context full at 24 tokens);" in done.stderr, done.stderr


def test_finish_descriptions():
    from mlapipe.runtime.display import finish_description

    assert finish_description("stop", 5, 3, 64, 512) == "stop (end of sequence)"
    assert finish_description("length", 5, 64, 64, 512) == "length (64 tokens asked)"
    assert finish_description("length", 500, 12, 64, 512) == "length (context full at 512 tokens)"


def test_version():
    import mlapipe

    done = subprocess.run(
        [sys.executable, "-m", "mlapipe.runtime.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout == f"mlapipe {mlapipe.__version__}\n"
    with open(pathlib.Path(__file__).parents[1] / "pyproject.toml", "rb") as f:
        assert mlapipe.__version__ == tomllib.load(f)["project"]["version"]  # the installed one is this one


def test_demo_for_inspect_and_bench(cache, monkeypatch, capsys):
    from mlapipe.runtime.cli import main

    monkeypatch.setenv("MLAPIPE_CACHE", str(cache))
    assert main(["inspect", "--demo"]) == 0
    assert capsys.readouterr().out.startswith(f"model: {next(cache.glob('*.gguf'))}\n")
    assert main(["bench", "--demo", "-p", "8", "-n", "4", "-r", "1", "--devices", "cpu"]) == 0
    out, err = capsys.readouterr()
    table = out.split("\n\n")[0].splitlines()  # the table first, then the memory report
    assert table[0].startswith("|") and "model" in table[0] and len(table) == 4  # header, rule, pp8, tg4
    assert all(line.startswith("|") for line in table)
    assert out.split("\n\n")[1].startswith("memory of ")
    assert "['" not in out  # no raw Python lists
    assert err.count("bench: wtype file pipeline 1") == 2  # progress goes to stderr


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


def test_chat_prompt_runs_the_template_with_one_bos(cache):
    _mlapipe("generate", "--demo", "-p", "x", "-n", "1", cache=cache)  # builds the demo model once
    tokenizer = _demo_tokenizer(cache)
    messages = [{"role": "user", "content": "Hi there"}]
    ids = tokenizer.encode_chat(messages)
    assert ids.count(tokenizer.bos_token_id) == 1  # the template writes BOS; nothing adds a second
    done = _mlapipe("generate", "--demo", "--chat", "-p", "Hi there", "-n", "2", cache=cache)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(tokenizer.apply_chat_template(messages))
    assert f"prompt {len(ids)} tokens" in done.stderr, done.stderr

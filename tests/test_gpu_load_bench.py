"""The GPU load benchmark (tests/gpu_load_bench.py), down-scaled to a tiny shape on the CPU, so the
script the GPU run uses is known to work: it writes a valid ik-layout Q8_0 file of random blocks with
the values' intended scale, loads it through the engine's loader and prints its table."""

import numpy as np

from mlapipe.runtime.gguf_model import GGUFModel
from tests import gpu_load_bench


def test_load_bench_writes_a_valid_file_and_times_loading_it(tmp_path, capsys):
    path = str(tmp_path / "tiny-q8_0-ik.gguf")
    assert gpu_load_bench.main(["--shape", "tiny", "--device", "cpu", "--out", path, "--keep"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("load benchmark") :]
    for row in (
        "layout                     ik",
        "load to device",
        "peak host RssAnon",
        "all values finite          True",
    ):
        assert row in table, table
    assert "tensors in blocks / dense" in table and not table.split("tensors in blocks / dense")[
        1
    ].startswith("  0 /")
    # the same file again, every weight decoded
    assert (
        gpu_load_bench.main(
            ["--shape", "tiny", "--device", "cpu", "--out", path, "--reuse", "--keep", "--dequantize"]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert (
        "decoded to bf16/f32" in table
        and "all values finite          True" in table
        and "write " not in table
    )
    model = GGUFModel(path)
    assert model.mla_layout == "ik" and model.type_summary()["Q8_0"][0] > 0
    assert (
        model.metadata["general.name"].startswith("tiny")
        and len(model.metadata["tokenizer.ggml.tokens"]) == 1024
    )
    w = model.read("layers.1.moe.w_gate")  # (E, I, 256) Q8_0: std 1/sqrt(256)
    assert abs(float(w.std()) * np.sqrt(256) - 1) < 0.05
    embed = model.read("embed")
    assert abs(float(embed.std()) - 1) < 0.05

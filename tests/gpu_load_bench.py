"""Load-time benchmark: a DeepSeek-V2-Lite-shaped Q8_0 GGUF in ik_llama.cpp's layout (~16.8 GB, the
real tensor names and metadata), written with random valid blocks, then loaded onto one device the way
the engine loads it (workers/model_runner.py load_shard_weights), and optionally `mlapipe bench -m`.

    python3 tests/gpu_load_bench.py --out /tmp/v2lite-q8_0-ik.gguf [--bench] [--cold] [--dequantize] [--keep]
    python3 tests/gpu_load_bench.py --shape tiny --device cpu --out /tmp/t.gguf   # CI-sized check

The file is written straight to disk a tensor at a time from a small repeated block pattern (a few
seconds per GB, no 16 GB array in memory): Q8_0 blocks of uniform random int8 quants with one fp16
scale per tensor chosen so the values have std 1/sqrt(fan_in) (1 for the embedding), F32 norms near 1
and an F32 router, as the converters keep them. The load is timed from opening the file to the last
weight on the device (synchronized); host memory is sampled meanwhile from /proc/self/status: RssAnon
(the process's own memory: what the loader must keep near one tensor) apart from RssFile (pages of the
memory-mapped file, which belong to the page cache). `--cold` drops the page cache first (root only).
Prints a short table last.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import threading
import time

import gguf
import numpy as np
import torch

from mlapipe.kernels.quant.reference import dequantize_rows
from mlapipe.kernels.quant.tensor import QuantTensor
from mlapipe.runtime.config import ModelConfig
from mlapipe.runtime.gguf_layouts import FORMS, gguf_name, model_shapes
from mlapipe.runtime.gguf_model import GGUFModel
from mlapipe.runtime.gguf_writer import ARCH, KEEP_F32, Vocab, add_metadata, metadata_items
from mlapipe.runtime.tiny_models import build_vocab, tiny_config
from mlapipe.workers.model_runner import load_shard_weights

Q8_0 = gguf.GGMLQuantizationType.Q8_0
BLOCK_ELEMS, BLOCK_BYTES = gguf.GGML_QUANT_SIZES[Q8_0]
INT8_STD = math.sqrt((256**2 - 1) / 12)  # std of uniform int8 quants
PATTERN_BLOCKS = 1 << 16  # 2.2 MB of blocks, repeated through each tensor

# DeepSeek-V2-Lite's config.json, as an HF config dict (what tiny_config returns for the small ones)
V2_LITE = dict(
    vocab_size=102400,
    hidden_size=2048,
    intermediate_size=10944,
    num_hidden_layers=27,
    num_attention_heads=16,
    num_key_value_heads=16,
    q_lora_rank=None,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    moe_intermediate_size=1408,
    n_routed_experts=64,
    num_experts_per_tok=6,
    n_shared_experts=2,
    first_k_dense_replace=1,
    topk_method="greedy",
    scoring_func="softmax",
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
    n_group=1,
    topk_group=1,
    max_position_embeddings=163840,
    rms_norm_eps=1e-6,
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    name="DeepSeek-V2-Lite (random Q8_0 blocks)",
)


def padded_vocab(size: int) -> Vocab:
    """Our small trained BPE vocabulary padded to `size` with [PAD{i}] tokens (type UNUSED), as the
    converters pad a vocabulary shorter than the embedding."""
    vocab = build_vocab(pre="deepseek-llm")
    extra = size - len(vocab.tokens)
    return Vocab(
        vocab.tokens + [f"[PAD{i}]" for i in range(len(vocab.tokens), size)],
        vocab.token_types + [gguf.TokenType.UNUSED] * extra,
        vocab.merges,
        vocab.bos_token_id,
        vocab.eos_token_id,
        vocab.pre,
        chat_template=vocab.chat_template,
    )


class _PatternBytes:
    """Stands in for a tensor's bytes in GGUFWriter.write_tensor_data (which asks only nbytes and
    tofile): writes `nbytes` by repeating `pattern`, so no tensor-sized array exists."""

    def __init__(self, pattern: np.ndarray, nbytes: int):
        self.pattern, self.nbytes = pattern, nbytes

    def tofile(self, f) -> None:
        left = self.nbytes
        while left:
            piece = self.pattern[: min(left, self.pattern.nbytes)]
            piece.tofile(f)
            left -= piece.nbytes


def write_random_q8_0(path: str, cfg: dict, layout: str = "ik") -> int:
    """Writes the model's file with random valid blocks; returns its size in bytes."""
    vocab = padded_vocab(cfg["vocab_size"])
    writer = gguf.GGUFWriter(path, ARCH)
    add_metadata(writer, cfg, vocab, layout)
    meta = {f"{ARCH}.{key}": value for _, key, value in metadata_items(cfg, layout)}
    model_cfg = ModelConfig.from_gguf_metadata(meta | {"general.architecture": ARCH})
    rng = np.random.default_rng(0)
    plan = []
    for ours, shape in model_shapes(model_cfg, FORMS[layout]).items():
        name = gguf_name(ours)
        if len(shape) == 1 or name.endswith(KEEP_F32):
            values = (
                (1.0 + 0.1 * rng.standard_normal(shape)) if len(shape) == 1 else rng.standard_normal(shape)
            )
            data = (values / (1 if len(shape) == 1 else math.sqrt(shape[-1]))).astype(np.float32)
            writer.add_tensor_info(name, shape, np.dtype(np.float32), data.nbytes)
        else:
            std = 1.0 if ours == "embed" else 1 / math.sqrt(shape[-1])
            data = _PatternBytes(_q8_0_pattern(rng, std), math.prod(shape) // BLOCK_ELEMS * BLOCK_BYTES)
            writer.add_tensor_info(
                name, (*shape[:-1], shape[-1] // BLOCK_ELEMS * BLOCK_BYTES), np.uint8, data.nbytes, Q8_0
            )
        plan.append(data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in plan:
        writer.write_tensor_data(data)
    writer.close()
    return os.path.getsize(path)


def _q8_0_pattern(rng, std: float) -> np.ndarray:
    blocks = (
        rng.integers(-128, 128, (PATTERN_BLOCKS, BLOCK_BYTES), dtype=np.int16).astype(np.int8).view(np.uint8)
    )
    blocks[:, :2] = np.full((PATTERN_BLOCKS, 1), std / INT8_STD, dtype=np.float16).view(np.uint8)
    return blocks.reshape(-1)


class _HostMemory:
    """Peak RssAnon / RssFile of this process, sampled every 20 ms."""

    def __init__(self):
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def time_load(path: str, device: str, dequantize: bool = False) -> dict:
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    before = _HostMemory()
    before._sample()
    with _HostMemory() as memory:
        start = time.perf_counter()
        model = GGUFModel(path)
        opened = time.perf_counter()
        weights = load_shard_weights(model, 0, model.config.num_layers, dev, dtype, dequantize=dequantize)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        done = time.perf_counter()
    blocks = {n: w for n, w in weights.items() if isinstance(w, QuantTensor)}
    dense = {n: w for n, w in weights.items() if n not in blocks}
    finite = all(bool(torch.isfinite(w).all()) for w in dense.values())
    for w in blocks.values():  # one row of each block tensor decoded
        finite &= bool(
            torch.isfinite(dequantize_rows(w.data.reshape(-1, w.data.shape[-1])[:1], w.qtype)).all()
        )
    on_device = sum(w.nbytes for w in blocks.values()) + sum(
        w.numel() * w.element_size() for w in dense.values()
    )
    return {
        "layout": model.mla_layout,
        "file bytes": model.load_bytes,
        "open s": opened - start,
        "load s": done - opened,
        "GB/s": model.load_bytes / (done - opened) / 1e9,
        "peak RssAnon": memory.peak["RssAnon"] - before.peak["RssAnon"],
        "peak RssFile": memory.peak["RssFile"],
        "bytes on device": on_device,
        "block tensors": len(blocks),
        "dense tensors": len(dense),
        "all finite": finite,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", required=True, help="where to write the GGUF (written unless --reuse and present)"
    )
    p.add_argument("--shape", choices=["v2-lite", "tiny"], default="v2-lite")
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the shape has")
    p.add_argument("--layout", choices=["ik", "mainline", "kv_b"], default="ik")
    p.add_argument("--device", default="cuda")
    p.add_argument("--reuse", action="store_true", help="keep an existing file at --out")
    p.add_argument("--cold", action="store_true", help="drop the page cache before loading (root)")
    p.add_argument(
        "--dequantize", action="store_true", help="load every weight decoded (bf16), not in blocks"
    )
    p.add_argument("--bench", action="store_true", help="then run mlapipe bench -m on the file")
    p.add_argument("--keep", action="store_true", help="keep the file afterwards")
    args = p.parse_args(argv)
    if args.shape == "tiny":
        cfg = tiny_config("v2", 1024, hidden_size=256, num_attention_heads=2)
    else:
        cfg = dict(V2_LITE)
    if args.layers:
        cfg |= {"num_hidden_layers": args.layers, "first_k_dense_replace": min(1, args.layers)}
    rows = []
    if not (args.reuse and os.path.exists(args.out)):
        start = time.perf_counter()
        size = write_random_q8_0(args.out, cfg, args.layout)
        took = time.perf_counter() - start
        rows.append(("write", f"{size / 1e9:.2f} GB in {took:.1f} s ({size / took / 1e9:.2f} GB/s)"))
    if args.cold:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    result = time_load(args.out, args.device, args.dequantize)
    cache = "cold" if args.cold else "warm (just written)"
    rows += [
        ("layout", result["layout"]),
        (
            "device",
            args.device + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""),
        ),
        ("page cache", cache),
        ("weights", "decoded to bf16/f32" if args.dequantize else "kept in blocks where a kernel reads them"),
        ("tensor bytes in file", f"{result['file bytes'] / 1e9:.3f} GB"),
        ("open (metadata + index)", f"{result['open s']:.2f} s"),
        ("load to device", f"{result['load s']:.2f} s = {result['GB/s']:.2f} GB/s (file bytes / time)"),
        ("weights on device", f"{result['bytes on device'] / 1e9:.2f} GB"),
        ("tensors in blocks / dense", f"{result['block tensors']} / {result['dense tensors']}"),
        ("peak host RssAnon (own)", f"{result['peak RssAnon'] / 2**20:.0f} MiB"),
        ("peak host RssFile (mmap)", f"{result['peak RssFile'] / 2**20:.0f} MiB"),
        ("all values finite", str(result["all finite"])),
    ]
    if args.bench:
        bench = [
            sys.executable,
            "-m",
            "mlapipe.runtime.cli",
            "bench",
            "-m",
            args.out,
            "-p",
            "512",
            "-n",
            "128",
            "-r",
            "2",
        ]
        print(" ".join(bench), flush=True)
        done = subprocess.run(bench, capture_output=True, text=True)
        print(done.stdout + done.stderr[-3000:], flush=True)
        rows.append(("mlapipe bench exit code", str(done.returncode)))
    if not args.keep:
        os.remove(args.out)
    print("\nload benchmark")
    for key, value in rows:
        print(f"  {key:26s} {value}")
    return 0 if result["all finite"] else 1


if __name__ == "__main__":
    sys.exit(main())

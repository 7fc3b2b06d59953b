"""Reads a deepseek2 GGUF model (one file or gguf-split shards): metadata -> ModelConfig, a checked tensor
index, and each tensor's bytes moved to its device.

Every tensor in the files must be in the name table (runtime/gguf_layouts.py) and have the shape the
config implies, so a bad file fails at open time with its path and the problem named, not deep inside
a matmul. All three MLA layouts are accepted; either way the model gets `attn.w_uk` (H, N, C) and
`attn.w_uv` (H, V, C), the per-head up-projections of the latent.

Loading never copies a whole file to the host: the files stay memory-mapped, and each tensor's bytes
go from the mapping (the page cache) to its device. F32 / F16 / BF16 are converted on the device, the
block types are decoded there by kernels/quant's torch reference decoders (bit-identical to gguf's);
the few types without one (TQ1_0, TQ2_0, MXFP4) are dequantized by gguf on the host one tensor at a
time just before the upload, so host memory beyond the page cache stays at most about one tensor. `read_blocks` hands out the
raw block bytes for code that keeps weights quantized (kernels/quant/tensor.py's contract).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from mlapipe.kernels.quant.reference import dequantize_rows
from mlapipe.kernels.quant.types import QUANT_TYPES
from mlapipe.runtime.config import ConfigError, ModelConfig
from mlapipe.runtime.gguf_layouts import (
    MLAForm,
    detect_form,
    expected_shapes,
    gguf_name,
    model_shapes,
    our_name,
    unused_tensors,
)
from mlapipe.runtime.gguf_shards import ModelFileError, open_model_files
from mlapipe.runtime.gguf_types import SUPPORTED_TYPES, type_problem  # noqa: F401 (re-exported)

__all__ = ["GGUFModel", "ModelFileError", "TensorInfo", "expected_shapes", "gguf_name", "our_name"]

Q = GGMLQuantizationType
# file types uploaded as they are and converted on the device
DEVICE_CAST = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
# block types the torch reference decoders of kernels/quant decode on the device (bit-identical to gguf)
DEVICE_DECODERS = frozenset(code for code in QUANT_TYPES if Q(code) not in DEVICE_CAST)
DECODE_CHUNK_VALUES = 1 << 24  # values decoded per step: 64 MiB of fp32 temporaries
DtypeFor = Callable[[str, int], torch.dtype]  # (our name, ndim) -> the dtype it gets on its device


@dataclass(frozen=True)
class TensorInfo:
    gguf_name: str
    shape: tuple[int, ...]  # torch order (outermost first)
    qtype: GGMLQuantizationType
    num_bytes: int


class GGUFModel:
    """An open, validated deepseek2 model. Cheap to open: tensor data stays memory-mapped until loaded."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._files = open_model_files(self.path)
        self.paths = [f.path for f in self._files]  # the shards, first one first
        self.metadata = _decode_metadata(self._files[0].reader)
        try:
            self.config = ModelConfig.from_gguf_metadata(self.metadata)
        except ConfigError as e:
            raise ModelFileError(f"{self.paths[0]}: {e}") from None
        self.file_tensors, self._data = self._index_tensors()
        self.mla = self._check_shapes()
        unused = {f"layers.{i}.{n}" for i in range(self.config.num_layers) for n in unused_tensors(self.mla)}
        # what the model reads: the file's tensors less the duplicate MLA form it never reads
        self.tensors = {name: info for name, info in self.file_tensors.items() if name not in unused}
        self.on_bytes_read: Callable[[int], None] | None = None  # the engine's loading bar

    # index and validation -----------------------------------------------------------------------
    def _index_tensors(self) -> tuple[dict[str, TensorInfo], dict[str, np.ndarray]]:
        index: dict[str, TensorInfo] = {}
        data: dict[str, np.ndarray] = {}
        for f in self._files:
            file_size = os.path.getsize(f.path)
            for t in f.reader.tensors:
                name = our_name(t.name)
                if name is None:
                    raise ModelFileError(f"{f.path}: unknown tensor {t.name!r} for a deepseek2 model")
                if t.data_offset + t.n_bytes > file_size:
                    raise ModelFileError(f"{f.path}: truncated file: tensor {t.name!r} runs past the end")
                problem = type_problem(t.name, int(t.tensor_type))
                if problem:
                    raise ModelFileError(f"{f.path}: {problem}")
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))
                index[name] = TensorInfo(t.name, shape, Q(t.tensor_type), int(t.n_bytes))
                data[name] = f.reader.data[t.data_offset : t.data_offset + t.n_bytes]
        return index, data

    def _check_shapes(self) -> MLAForm:
        cfg, index = self.config, self.file_tensors
        prefix = "layers.0."
        form = detect_form({n[len(prefix) :]: t.shape for n, t in index.items() if n.startswith(prefix)})
        if form is None:
            raise ModelFileError(
                f"{self.paths[0]}: layer 0 has neither 'blk.0.attn_kv_b.weight' nor "
                "'blk.0.attn_k_b.weight' + 'blk.0.attn_v_b.weight': no MLA up-projection"
            )
        want = model_shapes(cfg, form)
        for name, shape in want.items():
            if name not in index:
                raise ModelFileError(
                    f"{self.paths[0]}: missing tensor {gguf_name(name)!r} ({form.layout} layout)"
                )
            if index[name].shape != shape:
                raise ModelFileError(
                    f"{self._file_of(name)}: tensor {index[name].gguf_name!r} has shape {list(index[name].shape)}, "
                    f"expected {list(shape)} from the model's metadata ({form.layout} layout)"
                )
        for name, info in index.items():
            if name not in want:
                raise ModelFileError(
                    f"{self._file_of(name)}: unexpected tensor {info.gguf_name!r} for this config "
                    f"({form.layout} layout)"
                )
        return form

    def _file_of(self, name: str) -> str:
        gguf = self.file_tensors[name].gguf_name
        return next(f.path for f in self._files if any(t.name == gguf for t in f.reader.tensors))

    @property
    def mla_layout(self) -> str:
        """'kv_b', 'ik' or 'mainline' (runtime/gguf_layouts.py)."""
        return self.mla.layout

    # raw bytes --------------------------------------------------------------------------------------
    def read_blocks(self, name: str) -> tuple[np.ndarray, int, tuple[int, ...]]:
        """One tensor's bytes as the file holds them, without a copy: (uint8 memory-mapped view shaped
        (*lead, rows, row_bytes), ggml type code, logical torch-order shape (*lead, rows, cols)), the
        contract of kernels/quant/tensor.py. Row r is the concatenation of its blocks along the last
        ("K") dimension. 1-D tensors come as a single row. Names are ours (see `tensors`); which MLA
        tensors the model reads is `mla.source` (the canonical w_uk / w_uv are derived in load_layer)."""
        info = self.tensors[name] if name in self.tensors else self.file_tensors[name]
        block_elems, block_bytes = GGML_QUANT_SIZES[info.qtype]
        rows_shape = info.shape[:-1] or (1,)
        row_bytes = info.shape[-1] // block_elems * block_bytes
        return self._data[name].reshape(*rows_shape, row_bytes), int(info.qtype), info.shape

    # loading --------------------------------------------------------------------------------------
    def load_blocks(self, name: str, device: torch.device | str) -> torch.Tensor:
        """read_blocks' bytes copied straight from the mapping to `device` (a tensor of its own)."""
        blocks, _, _ = self.read_blocks(name)
        on_device = torch.from_numpy(blocks).to(device)
        if on_device.device.type == "cpu":
            on_device = on_device.clone()  # own memory, not the file's pages
        if self.on_bytes_read is not None:
            self.on_bytes_read(self.file_tensors[name].num_bytes)
        return on_device

    def load(self, name: str, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """One tensor of ours, as `dtype` on `device` (a tensor of its own, never a view of the file)."""
        info = self.tensors[name] if name in self.tensors else self.file_tensors[name]
        device = torch.device(device)
        raw = self._data[name]
        if info.qtype in DEVICE_CAST or int(info.qtype) in DEVICE_DECODERS:
            on_device = torch.from_numpy(raw).to(device)  # the bytes, straight from the mapping
            if info.qtype in DEVICE_CAST:
                values = on_device.view(DEVICE_CAST[info.qtype]).reshape(info.shape)
                if values.device.type == "cpu" and values.dtype == dtype:
                    values = values.clone()  # own memory, not the file's pages
                values = values.to(dtype)
            else:
                values = _decode_on_device(on_device, int(info.qtype), info.shape, dtype)
        else:  # a type without a torch decoder: dequantized on the host by gguf, one tensor, then uploaded
            values = torch.from_numpy(gguf_quants.dequantize(raw, info.qtype).reshape(info.shape))
            values = values.to(device=device, dtype=dtype)
        if self.on_bytes_read is not None:
            self.on_bytes_read(info.num_bytes)
        return values

    def load_layer(
        self, layer: int, device: torch.device | str, dtype_for: DtypeFor
    ) -> dict[str, torch.Tensor]:
        """Layer weights under our names (without the 'layers.N.' prefix), with the MLA up-projection in
        canonical form, attn.w_uk (H, N, C) and attn.w_uv (H, V, C), whichever layout the file uses."""
        cfg = self.config
        H, N, V, C = cfg.num_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        prefix = f"layers.{layer}."
        weights = {
            name[len(prefix) :]: self.load(name, device, dtype_for(name[len(prefix) :], len(info.shape)))
            for name, info in self.tensors.items()
            if name.startswith(prefix)
        }
        if self.mla.has_kv_b:
            kv_b = weights.pop("attn.wkv_b").view(H, N + V, C)
            weights["attn.w_uk"], weights["attn.w_uv"] = kv_b[:, :N].contiguous(), kv_b[:, N:].contiguous()
        elif self.mla.split_rank == 3:  # (H, C, N), (H, V, C)
            weights["attn.w_uk"] = weights.pop("attn.wk_b").transpose(1, 2).contiguous()
            weights["attn.w_uv"] = weights.pop("attn.wv_b")
        else:  # ik's 2-D (H*C, N), (H*V, C)
            weights["attn.w_uk"] = weights.pop("attn.wk_b").view(H, C, N).transpose(1, 2).contiguous()
            weights["attn.w_uv"] = weights.pop("attn.wv_b").view(H, V, C)
        return weights

    def read(self, name: str) -> np.ndarray:
        """One tensor of ours, dequantized to float32 on the host, in torch order."""
        return self.load(name, "cpu", torch.float32).numpy()

    def read_layer(self, layer: int) -> dict[str, np.ndarray]:
        """load_layer on the host in float32, as numpy arrays."""
        weights = self.load_layer(layer, "cpu", lambda name, ndim: torch.float32)
        return {k: v.numpy() for k, v in weights.items()}

    def layer_tensor_names(self, layer: int) -> list[str]:
        prefix = f"layers.{layer}."
        return [name for name in self.tensors if name.startswith(prefix)]

    # summaries ----------------------------------------------------------------------------------
    @property
    def load_bytes(self) -> int:
        """Bytes a full load reads from the files."""
        return sum(t.num_bytes for t in self.tensors.values())

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors.values())

    def type_summary(self) -> dict[str, tuple[int, int]]:
        """quant type -> (tensor count, bytes), over every tensor in the files."""
        summary: dict[str, tuple[int, int]] = {}
        for t in self.file_tensors.values():
            count, size = summary.get(t.qtype.name, (0, 0))
            summary[t.qtype.name] = (count + 1, size + t.num_bytes)
        return summary


def _decode_on_device(
    data: torch.Tensor, qtype: int, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Block bytes already on their device -> values, decoded there by the torch reference decoders
    (bit-identical to gguf's numpy ones), a bounded number of rows at a time so the fp32 temporaries
    stay small beside the tensor itself."""
    cols = shape[-1]
    rows = data.view(-1, data.numel() // max(1, math.prod(shape[:-1])))
    out = torch.empty((rows.shape[0], cols), dtype=dtype, device=data.device)
    step = max(1, DECODE_CHUNK_VALUES // cols)
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = dequantize_rows(rows[start : start + step], qtype).to(dtype)
    return out.reshape(shape)


def _decode_metadata(reader) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}

"""Damaged copies of a GGUF file, for the fuzz test: seeded, each one a (kind, description, bytes) triple.

Field positions come from gguf's own reader (each ReaderField's offset and parts), not from the code
under test. Kinds:
- flip-header / flip-metadata / flip-tensor-info: one random bit flipped in that region (the metadata
  region's numeric scalar values excepted: flipping those gives a valid file of a different model, as a
  GGUF has no checksum; they get wrong types and out-of-range values instead, below);
- count: absurd or off-by-some tensor / metadata counts in the header;
- truncate: the file cut at a random byte (header, metadata, tensor infos or data);
- wrong-type, out-of-range, missing: a deepseek2 key rewritten with another GGUF type, an invalid value,
  or left out (required keys only: an optional key left out is the default, a valid file);
- nested: an array of arrays;
- dims, offset, alignment, retype: tensor infos with absurd dimensions, misaligned / overlapping /
  wrapped / out-of-file offsets, a bad general.alignment, a tensor retyped to another ggml type.
"""

from __future__ import annotations

import math
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

T = gguf.GGUFValueType
SCALAR_FORMATS = {
    T.UINT8: "<B",
    T.INT8: "<b",
    T.UINT16: "<H",
    T.INT16: "<h",
    T.UINT32: "<I",
    T.INT32: "<i",
    T.FLOAT32: "<f",
    T.BOOL: "<B",
    T.UINT64: "<Q",
    T.INT64: "<q",
    T.FLOAT64: "<d",
}
NUMERIC = {
    T.UINT8,
    T.INT8,
    T.UINT16,
    T.INT16,
    T.UINT32,
    T.INT32,
    T.FLOAT32,
    T.UINT64,
    T.INT64,
    T.FLOAT64,
    T.BOOL,
}


@dataclass
class Field:
    key: str
    start: int
    end: int
    kind: T  # the value's type (ARRAY for arrays)
    raw: bytes


@dataclass
class Layout:
    data: bytes
    fields: list[Field]  # metadata entries, in file order
    infos: list[tuple[str, int, int, list[int]]]  # (name, start, end, part sizes) of each tensor info
    info_end: int
    data_offset: int
    alignment: int


def read_layout(path: str) -> Layout:
    reader = gguf.GGUFReader(path)
    data = Path(path).read_bytes()
    base = reader.data.ctypes.data
    fields = []
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        end = f.offset + sum(p.nbytes for p in f.parts)
        fields.append(Field(key, f.offset, end, T(f.types[0]), data[f.offset : end]))
    infos = []
    for t in reader.tensors:
        parts = t.field.parts
        assert parts[0].ctypes.data - base == t.field.offset
        infos.append(
            (t.name, t.field.offset, t.field.offset + sum(p.nbytes for p in parts), [p.nbytes for p in parts])
        )
    alignment = (
        int(reader.fields["general.alignment"].contents()) if "general.alignment" in reader.fields else 32
    )
    return Layout(data, fields, infos, infos[-1][2], reader.data_offset, alignment)


def encode_kv(key: str, kind: T, value) -> bytes:
    name = key.encode()
    return struct.pack("<Q", len(name)) + name + struct.pack("<I", kind) + encode_value(kind, value)


def encode_value(kind: T, value) -> bytes:
    if kind == T.STRING:
        raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else bytes(value)
        return struct.pack("<Q", len(raw)) + raw
    if kind == T.ARRAY:
        item_kind, items = value
        return struct.pack("<IQ", item_kind, len(items)) + b"".join(encode_value(item_kind, v) for v in items)
    return struct.pack(SCALAR_FORMATS[kind], value)


def rebuild(
    layout: Layout, fields: list[bytes], infos: list[bytes] | None = None, alignment: int | None = None
) -> bytes:
    """A file with these metadata entries and tensor infos over the original data section, which moves
    to the new aligned start (offsets are relative to it, so they stay right)."""
    infos = infos if infos is not None else [layout.data[s:e] for _, s, e, _ in layout.infos]
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(fields)) + b"".join(fields) + b"".join(infos)
    align = alignment or layout.alignment
    head += b"\0" * (-len(head) % align)
    return head + layout.data[layout.data_offset :]


class Mutator:
    def __init__(self, layout: Layout, seed: int):
        self.layout = layout
        self.rng = random.Random(seed)
        self.original_fields = [f.raw for f in layout.fields]

    def flip(self, lo: int, hi: int) -> tuple[str, bytes]:
        data = bytearray(self.layout.data)
        pos = self.rng.randrange(lo, hi)
        bit = self.rng.randrange(8)
        data[pos] ^= 1 << bit
        return f"bit {bit} of byte {pos}", bytes(data)

    def with_field(self, key: str, raw: bytes | None) -> bytes:
        fields = [raw if f.key == key else f.raw for f in self.layout.fields]
        return rebuild(self.layout, [f for f in fields if f is not None])

    def field(self, key: str) -> Field:
        return next(f for f in self.layout.fields if f.key == key)

    # the kinds -------------------------------------------------------------------------------------
    def flip_header(self):
        return self.flip(0, 24)

    def flip_metadata(self):
        # anywhere in the metadata except the value bytes of numeric scalars (see the module docstring)
        f = self.rng.choice(self.layout.fields)
        hi = f.end - (struct.calcsize(SCALAR_FORMATS[f.kind]) if f.kind in NUMERIC else 0)
        what, data = self.flip(f.start, hi)
        return f"{f.key}: {what}", data

    def flip_tensor_info(self):
        name, start, end, _ = self.rng.choice(self.layout.infos)
        what, data = self.flip(start, end)
        return f"{name}: {what}", data

    def count(self):
        which = self.rng.choice(["tensor", "kv"])
        pos = 8 if which == "tensor" else 16
        old = struct.unpack_from("<Q", self.layout.data, pos)[0]
        new = self.rng.choice([0, 1, old - 1, old + 1, old * 2, 10**9, 2**32, 2**62, 2**63, 2**64 - 1])
        data = bytearray(self.layout.data)
        struct.pack_into("<Q", data, pos, new % 2**64)
        return f"{which} count {old} -> {new}", bytes(data)

    def truncate(self):
        region = self.rng.choice(["header", "metadata", "infos", "data"])
        lo, hi = {
            "header": (0, 24),
            "metadata": (24, self.layout.infos[0][1]),
            "infos": (self.layout.infos[0][1], self.layout.data_offset),
            "data": (self.layout.data_offset, len(self.layout.data)),
        }[region]
        cut = self.rng.randrange(lo, hi)
        return f"cut at byte {cut} ({region})", self.layout.data[:cut]

    def _arch_fields(self) -> list[Field]:
        return [f for f in self.layout.fields if f.key.startswith("deepseek2.") and f.kind != T.ARRAY]

    def wrong_type(self):
        f = self.rng.choice(self._arch_fields())
        choices: list[tuple[T, object]] = [
            (T.STRING, "3"),
            (T.STRING, ""),
            (T.BOOL, 1),
            (T.ARRAY, (T.INT32, [1, 2])),
            (T.ARRAY, (T.STRING, ["x"])),
        ]
        if f.kind in (T.FLOAT32, T.FLOAT64):
            choices += [(T.UINT32, 3), (T.INT64, 1)]
        elif f.kind == T.BOOL:
            choices += [(T.UINT8, 1), (T.FLOAT32, 1.0), (T.UINT32, 0)]
        elif f.kind == T.STRING:
            choices += [(T.UINT32, 2), (T.FLOAT32, 1.0)]
        else:  # integers
            choices += [(T.FLOAT32, 2.0), (T.FLOAT64, 64.0)]
        kind, value = self.rng.choice(choices)
        return f"{f.key} as {kind.name} {value!r}", self.with_field(f.key, encode_kv(f.key, kind, value))

    def out_of_range(self):
        f = self.rng.choice([f for f in self._arch_fields() if f.kind in NUMERIC - {T.BOOL}])
        if f.kind in (T.FLOAT32, T.FLOAT64):
            value = self.rng.choice([math.nan, math.inf, -math.inf, -1.0, -1e-6, 1e30, 3.4e38])
            if f.key.endswith("yarn_log_multiplier"):
                value = self.rng.choice([math.nan, math.inf, -1.0, 1e30])
        else:
            value = self.rng.choice([2**32 - 1, 2**31, 10**9, 0xDEADBEEF])
            # the demo has 16 experts in 4 groups, 2 used, 4 experts per token: values that do not divide
            # the experts, exceed what there is, or leave fewer experts in the groups used than top-k
            if f.key.endswith("expert_group_count"):
                value = self.rng.choice([3, 5, 16, 17, 32, 10**6])
            elif f.key.endswith("expert_group_used_count"):
                value = self.rng.choice([5, 16, 10**6])
            elif f.key.endswith("expert_used_count"):
                value = self.rng.choice([17, 10**6])
        kind = f.kind if f.kind in (T.FLOAT32, T.FLOAT64) else T.UINT32
        if kind == T.FLOAT32 and math.isfinite(value) and abs(value) > 3.4e38:
            kind = T.FLOAT64
        current = struct.unpack(SCALAR_FORMATS[f.kind], f.raw[-struct.calcsize(SCALAR_FORMATS[f.kind]) :])[0]
        if value == current:
            value = 2**32 - 1 if kind == T.UINT32 else math.nan
        return f"{f.key} = {value!r} (was {current!r})", self.with_field(f.key, encode_kv(f.key, kind, value))

    REQUIRED = (
        "deepseek2.block_count",
        "deepseek2.embedding_length",
        "deepseek2.context_length",
        "deepseek2.attention.head_count",
        "deepseek2.attention.kv_lora_rank",
        "deepseek2.attention.layer_norm_rms_epsilon",
        "deepseek2.rope.dimension_count",
        "general.architecture",
        "tokenizer.ggml.tokens",
    )

    def missing(self):
        key = self.rng.choice(self.REQUIRED)
        return f"{key} left out", self.with_field(key, None)

    def nested(self):
        f = self.rng.choice(self.layout.fields)
        value = (T.ARRAY, [(T.UINT32, [1, 2]), (T.UINT32, [3])])
        how = self.rng.choice(["replace", "retag"])
        if how == "retag" and f.kind == T.ARRAY:  # the item type of an existing array set to ARRAY
            raw = bytearray(f.raw)
            struct.pack_into("<I", raw, 8 + len(f.key.encode()) + 4, T.ARRAY)  # key length, key, type
            return f"{f.key}: item type set to ARRAY", self.with_field(f.key, bytes(raw))
        return f"{f.key} replaced by an array of arrays", self.with_field(
            f.key, encode_kv(f.key, T.ARRAY, value)
        )

    def _info(self):
        return self.rng.randrange(len(self.layout.infos))

    def _with_info(self, index: int, raw: bytes) -> bytes:
        infos = [self.layout.data[s:e] for _, s, e, _ in self.layout.infos]
        infos[index] = raw
        return rebuild(self.layout, self.original_fields, infos)

    def _info_parts(self, index: int) -> tuple[str, list[int], int, int]:
        name, start, end, _ = self.layout.infos[index]
        raw = self.layout.data[start:end]
        n = len(name.encode())
        n_dims = struct.unpack_from("<I", raw, 8 + n)[0]
        dims = list(struct.unpack_from(f"<{n_dims}Q", raw, 12 + n))
        qtype, offset = struct.unpack_from("<IQ", raw, 12 + n + 8 * n_dims)
        return name, dims, qtype, offset

    @staticmethod
    def _encode_info(name: str, dims: list[int], qtype: int, offset: int, n_dims: int | None = None) -> bytes:
        raw = name.encode()
        count = len(dims) if n_dims is None else n_dims
        return (
            struct.pack("<Q", len(raw))
            + raw
            + struct.pack("<I", count)
            + b"".join(struct.pack("<Q", d % 2**64) for d in dims)
            + struct.pack("<IQ", qtype, offset % 2**64)
        )

    def dims(self):
        i = self._info()
        name, dims, qtype, offset = self._info_parts(i)
        how = self.rng.choice(
            ["zero", "huge", "overflow", "one more", "swap", "n_dims 0", "n_dims 5", "double"]
        )
        new_dims, n_dims = list(dims), None
        if how == "zero":
            new_dims[self.rng.randrange(len(dims))] = 0
        elif how == "huge":
            new_dims[self.rng.randrange(len(dims))] = self.rng.choice([2**63, 2**64 - 1, 2**40])
        elif how == "overflow":
            new_dims = [2**32, 2**32, 2**8][: max(2, len(dims))]
        elif how == "one more":
            new_dims = dims + [self.rng.choice([1, 2, 7])]
        elif how == "swap" and len(dims) > 1 and dims[0] != dims[1]:
            new_dims[0], new_dims[1] = dims[1], dims[0]
        elif how == "double":
            new_dims[-1] = dims[-1] * 2
        elif how.startswith("n_dims"):
            n_dims = int(how[-1])
            new_dims = dims[:n_dims] if n_dims else []
        else:
            new_dims[-1] = dims[-1] + 1
        return f"{name}: dims {dims} -> {new_dims} ({how})", self._with_info(
            i, self._encode_info(name, new_dims, qtype, offset, n_dims)
        )

    def offset(self):
        i = self._info()
        name, dims, qtype, offset = self._info_parts(i)
        other = self._info_parts(self.rng.randrange(len(self.layout.infos)))[3]
        size = len(self.layout.data) - self.layout.data_offset
        new = self.rng.choice(
            [
                offset + self.rng.randrange(1, self.layout.alignment),  # misaligned
                other,  # overlaps another tensor (or itself: then the original)
                offset + self.layout.alignment,
                offset - self.layout.alignment,
                2**64 - self.layout.alignment,  # wraps around when the size is added
                2**64 - 1,
                size,  # at the end of the file
                size + 4096,
                offset + 2**63,
            ]
        )
        return f"{name}: offset {offset} -> {new}", self._with_info(
            i, self._encode_info(name, dims, qtype, new)
        )

    def alignment(self):
        value = self.rng.choice([0, 1, 3, 16, 24, 64, 4096, 2**31, 2**32 - 1])
        kind = self.rng.choice([T.UINT32, T.UINT32, T.UINT64, T.STRING])
        raw = encode_kv("general.alignment", kind, str(value) if kind == T.STRING else value)
        fields = [f.raw for f in self.layout.fields if f.key != "general.alignment"] + [raw]
        rebuild_align = value if kind == T.UINT32 and 0 < value <= 4096 and not value & (value - 1) else None
        # the data section moves to that alignment's boundary; offsets (multiples of 32) stay as written
        return f"general.alignment = {value!r} as {kind.name}", rebuild(
            self.layout, fields, alignment=rebuild_align
        )

    def retype(self):
        i = self._info()
        name, dims, qtype, offset = self._info_parts(i)
        new = self.rng.choice([q for q in gguf.GGML_QUANT_SIZES if q != qtype] + [9999, 2**32 - 1])
        return (
            f"{name}: type {gguf.GGMLQuantizationType(qtype).name} -> {getattr(new, 'name', new)}",
            self._with_info(i, self._encode_info(name, dims, int(new), offset)),
        )


# kind -> how many of it: 2,500 in all, weighted towards the flips (the least predictable)
PLAN = {
    "flip_header": 150,
    "flip_metadata": 500,
    "flip_tensor_info": 450,
    "count": 100,
    "truncate": 200,
    "wrong_type": 250,
    "out_of_range": 250,
    "missing": 60,
    "nested": 60,
    "dims": 180,
    "offset": 150,
    "alignment": 50,
    "retype": 100,
}


def mutations(path: str, seed: int):
    """Yields (kind, description, bytes) for every mutation of PLAN, in a seeded order."""
    mutator = Mutator(read_layout(path), seed)
    for kind, count in PLAN.items():
        for _ in range(count):
            description, data = getattr(mutator, kind)()
            yield kind, description, data

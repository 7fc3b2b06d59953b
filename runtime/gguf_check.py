"""Checks a GGUF file as a whole before anything else parses it, with work and memory bounded by its size.

gguf's own reader trusts the header: it allocates what the counts say, follows nested arrays, decodes
strings lazily (a bad one raises UnicodeDecodeError far from the file's name) and never relates a
tensor's offset and type to the bytes actually there, so a damaged file can hang, exhaust memory, or
load and compute garbage. This module reads the header itself (the layout of ggml's gguf.cpp) and
refuses, naming the file and the problem:
- a bad magic or version, big-endian files;
- counts (metadata entries, tensors, array items, string lengths) larger than the bytes left in the
  file could hold, so nothing is allocated or looped over beyond what the file's size allows;
- nested arrays (no GGUF writer makes them; ggml refuses them too), unknown value types, duplicate
  keys, keys or strings that are not UTF-8, bools other than 0 / 1, a general.alignment that is not a
  power of two;
- tensor infos: names longer than ggml's 63 bytes or repeated, 0 or more than 4 dimensions, zero or
  overflowing dimensions, type codes gguf does not know, a row length that is not a whole number of
  blocks;
- the data section: every tensor's bytes (its type's block size x its shape) aligned, inside the
  file, and the tensors laid end to end as every GGUF writer lays them (each at the aligned end of the
  one before, in offset order). So an overlap, an offset that wraps around, a tensor retyped to a
  smaller type or given a smaller shape (which would leave a hole, and read the wrong bytes), or
  trailing garbage is refused instead of computed on.
- metadata against the one key table (runtime/gguf_keys.py): every key it lists has its type and
  range, and a key of the architecture's namespace that it does not list, or a key in no namespace a
  GGUF writer uses, is refused: it is most likely a damaged or misspelt name, and reading the real
  key's default instead would run a different model (a GGUF has no checksum to tell).
Only then is the file handed to gguf's reader.

    check_gguf_file(path, ModelFileError)   # raises ModelFileError(f"{path}: ...") on the first problem
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mlapipe.runtime.gguf_types import type_problem

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 had 32-bit counts; gguf and llama.cpp read 2 and 3
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64 with the terminating NUL
MAX_KEY_BYTES = 65535
INT64_MAX = (1 << 63) - 1

# Key namespaces llama.cpp's tools write besides the architecture's own (llama-arch.cpp, llama-quantize's
# quantize.imatrix.*, imatrix files); a key outside them is taken for a damaged name.
KNOWN_NAMESPACES = ("general", "tokenizer", "split", "quantize", "imatrix")

# GGUF value types: code -> (name, struct format of a scalar or None for string / array)
STRING, ARRAY, BOOL = 8, 9, 7
VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("uint8", "<B"),
    1: ("int8", "<b"),
    2: ("uint16", "<H"),
    3: ("int16", "<h"),
    4: ("uint32", "<I"),
    5: ("int32", "<i"),
    6: ("float32", "<f"),
    7: ("bool", "<B"),
    8: ("string", None),
    9: ("array", None),
    10: ("uint64", "<Q"),
    11: ("int64", "<q"),
    12: ("float64", "<d"),
}
# The least bytes one entry can take, for capping counts by the bytes left.
MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset


class _Problem(Exception):
    """Internal: the first problem found; check_gguf_file turns it into the caller's error type."""


@dataclass(frozen=True)
class TensorExtent:
    name: str
    dims: tuple[int, ...]  # ggml order (innermost first), as in the file
    qtype: GGMLQuantizationType
    offset: int  # from the start of the data section
    num_bytes: int


@dataclass(frozen=True)
class GGUFLayout:
    """What the check read: enough to know where everything is."""

    version: int
    alignment: int
    data_offset: int  # the data section's start in the file
    metadata: dict[str, Any]  # scalars as Python values, string arrays as lists, numeric arrays as lists
    tensors: list[TensorExtent]


def check_gguf_file(path: str, error: type[Exception] = ValueError) -> GGUFLayout:
    """Reads and checks the whole header and the data section's layout; raises error(f"{path}: why")."""
    try:
        return _check(path)
    except _Problem as problem:
        raise error(f"{path}: {problem}") from None
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from None


def _check(path: str) -> GGUFLayout:
    if not os.path.isfile(path):
        raise _Problem("no such file")
    size = os.path.getsize(path)
    if size < 4:
        raise _Problem(f"not a GGUF file ({size} bytes)")
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            f.seek(0)
            raise _Problem(f"not a GGUF file (starts with {f.read(4)!r}, expected {MAGIC!r})")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _Header(data, size).read()


class _Header:
    def __init__(self, data: mmap.mmap, size: int):
        self.data, self.size, self.pos = data, size, 4

    # primitives: every read is bounds-checked against the file's size --------------------------------
    def take(self, count: int, what: str) -> bytes:
        if count > self.size - self.pos:
            raise _Problem(
                f"truncated or corrupt GGUF header: {what} needs {count} bytes at byte {self.pos}, "
                f"the file has {self.size - self.pos} left"
            )
        start, self.pos = self.pos, self.pos + count
        return self.data[start : self.pos]

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str, min_item_bytes: int) -> int:
        """A u64 count, refused if the bytes left cannot hold that many items."""
        n = self.scalar("<Q", what)
        most = (self.size - self.pos) // min_item_bytes
        if n > most:
            raise _Problem(
                f"truncated or corrupt GGUF header: {what} is {n}, but the {self.size - self.pos} bytes "
                f"left in the file hold at most {most}"
            )
        return n

    def string(self, what: str, max_bytes: int | None = None) -> str:
        n = self.count(f"length of {what}", 1)
        if max_bytes is not None and n > max_bytes:
            raise _Problem(f"{what} is {n} bytes long (at most {max_bytes})")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Problem(f"{what} is not UTF-8 (byte {e.start}: {raw[e.start : e.start + 4]!r})") from None

    # sections -------------------------------------------------------------------------------------
    def read(self) -> GGUFLayout:
        version = self.scalar("<I", "version")
        if version not in VERSIONS:
            if version & 0xFFFF == 0 and (version >> 16) in VERSIONS:
                raise _Problem("a big-endian GGUF file: only little-endian files are supported")
            raise _Problem(f"unsupported GGUF version {version} (this reader reads versions 2 and 3)")
        num_tensors = self.count("tensor count", MIN_TENSOR_INFO_BYTES)
        num_kv = self.count("metadata entry count", MIN_KV_BYTES)
        metadata: dict[str, Any] = {}
        for i in range(num_kv):
            key = self.string(f"metadata key {i}", MAX_KEY_BYTES)
            if not key:
                raise _Problem(f"metadata key {i} is empty")
            if key in metadata:
                raise _Problem(f"metadata key {key!r} appears twice")
            metadata[key] = self.value(key)
        _check_metadata(metadata)
        alignment = self.alignment(metadata)
        tensors = [self.tensor_info(i) for i in range(num_tensors)]
        data_offset = _align(self.pos, alignment)
        self.check_extents(tensors, alignment, data_offset)
        return GGUFLayout(version, alignment, data_offset, metadata, tensors)

    def value(self, key: str) -> Any:
        code = self.scalar("<I", f"type of {key!r}")
        if code not in VALUE_TYPES:
            raise _Problem(f"metadata key {key!r} has unknown value type {code}")
        if code == ARRAY:
            item = self.scalar("<I", f"item type of {key!r}")
            if item == ARRAY:
                raise _Problem(f"metadata key {key!r} is an array of arrays (nested arrays are not GGUF)")
            if item not in VALUE_TYPES:
                raise _Problem(f"metadata key {key!r} is an array of unknown value type {item}")
            fmt = VALUE_TYPES[item][1]
            n = self.count(f"item count of {key!r}", 8 if item == STRING else struct.calcsize(fmt))
            if item == STRING:
                return [self.string(f"item {j} of {key!r}") for j in range(n)]
            values = [v[0] for v in struct.iter_unpack(fmt, self.take(n * struct.calcsize(fmt), key))]
            if item == BOOL:
                return [self.boolean(key, v) for v in values]
            return values
        if code == STRING:
            return self.string(f"value of {key!r}")
        value = self.scalar(VALUE_TYPES[code][1], f"value of {key!r}")
        return self.boolean(key, value) if code == BOOL else value

    @staticmethod
    def boolean(key: str, value: int) -> bool:
        if value not in (0, 1):
            raise _Problem(f"metadata key {key!r} is a bool holding {value} (only 0 and 1 are bools)")
        return bool(value)

    @staticmethod
    def alignment(metadata: dict[str, Any]) -> int:
        value = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
            raise _Problem(f"general.alignment must be a power of two, got {value!r}")
        return value

    def tensor_info(self, i: int) -> TensorExtent:
        name = self.string(f"name of tensor {i}", MAX_NAME_BYTES)
        n_dims = self.scalar("<I", f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Problem(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
        dims = tuple(self.scalar("<Q", f"dimensions of {name!r}") for _ in range(n_dims))
        if any(d < 1 for d in dims) or math.prod(dims) > INT64_MAX:
            raise _Problem(f"tensor {name!r} has dimensions {list(dims)}")
        code = self.scalar("<I", f"type of {name!r}")
        try:
            qtype = GGMLQuantizationType(code)
            block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            # names ik_llama.cpp-only types and says the file is ik-specific (runtime/gguf_types.py)
            raise _Problem(
                type_problem(name, code) or f"tensor {name!r} has unknown type code {code}"
            ) from None
        if dims[0] % block_elems:
            raise _Problem(
                f"tensor {name!r} ({qtype.name}) has rows of {dims[0]} values, not a whole number of "
                f"{block_elems}-value blocks"
            )
        offset = self.scalar("<Q", f"data offset of {name!r}")
        num_bytes = math.prod(dims) // block_elems * block_bytes
        return TensorExtent(name, dims, qtype, offset, num_bytes)

    def check_extents(self, tensors: list[TensorExtent], alignment: int, data_offset: int) -> None:
        names: set[str] = set()
        for t in tensors:
            if t.name in names:
                raise _Problem(f"tensor {t.name!r} appears twice")
            names.add(t.name)
            if t.offset % alignment:
                raise _Problem(
                    f"tensor {t.name!r}: data offset {t.offset} is not a multiple of the alignment {alignment}"
                )
        if not tensors:  # a metadata-only file: no data section to check (and maybe no padding)
            return
        data_size = self.size - data_offset
        if data_size < 0:
            raise _Problem(f"truncated file: the data section would start at byte {data_offset}")
        expected = 0  # where the next tensor must start: the aligned end of the one before
        for t in sorted(tensors, key=lambda t: t.offset):
            where = f"tensor {t.name!r} ({t.qtype.name}, shape {list(t.dims)}, {t.num_bytes} bytes)"
            if t.offset + t.num_bytes > data_size:
                raise _Problem(
                    f"truncated or corrupt file: {where} at data offset {t.offset} runs past the end of "
                    f"the file ({data_size} bytes of data)"
                )
            if t.offset < expected:
                raise _Problem(
                    f"{where} at data offset {t.offset} overlaps the tensor before it (ends at {expected})"
                )
            if t.offset > expected:
                raise _Problem(
                    f"{where} starts at data offset {t.offset}, but the tensor before it ends at {expected}: "
                    f"{t.offset - expected} bytes belong to no tensor (a wrong type or shape in the tensor "
                    "infos?)"
                )
            expected = _align(t.offset + t.num_bytes, alignment)
        if data_size > expected:
            raise _Problem(
                f"{data_size - expected} bytes after the last tensor's data belong to no tensor (a wrong type "
                "or shape in the tensor infos?)"
            )


def _arch_keys_gguf_defines(arch: str) -> frozenset[str]:
    """Every `{arch}.*` key name in gguf-py's constants (gguf.Keys), formatted for `arch`."""
    from gguf import Keys

    names = set()
    for group in vars(Keys).values():
        for value in vars(group).values() if isinstance(group, type) else ():
            if isinstance(value, str) and value.startswith("{arch}.") and value.count("{") == 1:
                names.add(value.format(arch=arch))
    return frozenset(names)


def _check_metadata(metadata: dict[str, Any]) -> None:
    from mlapipe.runtime import gguf_keys

    prefix = f"{gguf_keys.ARCH}."
    if metadata.get("general.architecture") == gguf_keys.ARCH:
        strangers = sorted(
            k for k in metadata if k.split(".", 1)[0] not in (*KNOWN_NAMESPACES, gguf_keys.ARCH)
        )
        if strangers:
            raise _Problem(
                f"metadata key {strangers[0]!r} is in no namespace a GGUF writer uses "
                f"({', '.join(KNOWN_NAMESPACES)} and {gguf_keys.ARCH}): a damaged key name?"
            )
        # Keys gguf-py defines for any architecture are names a converter can write: those we do not
        # read are ignored, as llama.cpp ignores them. A name gguf-py does not define either is damaged or
        # misspelt, and would otherwise leave the real key at its default.
        known = _arch_keys_gguf_defines(gguf_keys.ARCH)
        unknown = sorted(
            k for k in metadata if k.startswith(prefix) and k not in gguf_keys.KEY_TABLE and k not in known
        )
        if unknown:
            raise _Problem(
                f"unknown metadata key {unknown[0]!r}: not a key gguf's writer defines nor one mlapipe "
                "reads (runtime/gguf_keys.py): a damaged or misspelt name?"
            )
    try:
        gguf_keys.check_all(metadata)
    except gguf_keys.ConfigError as e:
        raise _Problem(str(e)) from None


def _align(offset: int, alignment: int) -> int:
    return offset + (-offset % alignment)

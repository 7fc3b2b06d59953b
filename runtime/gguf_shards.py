"""Which files make up a model: one GGUF, or the shards gguf-split (and gguf-py's writer) produce.

gguf-split names shards `PREFIX-%05d-of-%05d.gguf` (1-based, llama_split_path in llama.cpp) and writes
`split.no` (u16, 0-based), `split.count` (u16) and `split.tensors.count` (i32, all shards together) into
every shard; only the first holds the model's other metadata. Given any shard, all are found from its
name and opened; llama.cpp's own checks apply (the name matches split.no / split.count, every shard
agrees, the tensor counts add up), and a missing shard is named.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from gguf import GGUFReader

from mlapipe.runtime import gguf_keys as keys
from mlapipe.runtime.gguf_check import check_gguf_file

SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


class ModelFileError(ValueError):
    """A model file that cannot be used; the message names the file and the problem."""


@dataclass
class ModelFile:
    path: str
    reader: GGUFReader


def shard_path(prefix: str, index: int, count: int) -> str:
    """llama.cpp's llama_split_path: index is 0-based, the name 1-based."""
    return f"{prefix}-{index + 1:05d}-of-{count:05d}.gguf"


def open_model_files(path: str) -> list[ModelFile]:
    """The model's files, the first shard (the one with the metadata) first."""
    given = ModelFile(path, open_reader(path))
    no, count = _split_key(given, "split.no"), _split_key(given, "split.count")
    if count <= 1:
        return [given]
    match = SHARD_NAME.match(os.path.basename(path))
    if not match or int(match["no"]) != no + 1 or int(match["count"]) != count:
        raise ModelFileError(
            f"{path}: shard {no + 1} of {count} (split.no / split.count), but its name does not end in "
            f"-{no + 1:05d}-of-{count:05d}.gguf, so the other shards cannot be found"
        )
    prefix = os.path.join(os.path.dirname(path), match["prefix"])
    paths = [shard_path(prefix, i, count) for i in range(count)]
    missing = [(i, p) for i, p in enumerate(paths) if not os.path.isfile(p)]
    if missing:
        names = ", ".join(f"shard {i + 1} ({p})" for i, p in missing)
        raise ModelFileError(f"{path}: {len(missing)} of the model's {count} shards missing: {names}")
    files = [given if i == no else ModelFile(p, open_reader(p)) for i, p in enumerate(paths)]
    for i, f in enumerate(files):
        if _split_key(f, "split.no") != i or _split_key(f, "split.count") != count:
            raise ModelFileError(
                f"{f.path}: split.no / split.count are {_split_key(f, 'split.no')} / "
                f"{_split_key(f, 'split.count')}, expected {i} / {count} for this name"
            )
    expected = _split_key(files[0], "split.tensors.count")
    found = sum(len(f.reader.tensors) for f in files)
    if expected is not None and expected != found:
        raise ModelFileError(
            f"{files[0].path}: split.tensors.count is {expected} but the {count} shards hold {found} tensors"
        )
    seen: dict[str, str] = {}
    for f in files:
        for t in f.reader.tensors:
            if t.name in seen:
                raise ModelFileError(f"{f.path}: tensor {t.name!r} is also in {seen[t.name]}")
            seen[t.name] = f.path
    return files


def open_reader(path: str) -> GGUFReader:
    check_gguf_file(path, ModelFileError)  # the whole file's structure, before gguf's reader trusts it
    try:
        # copy-on-write: tensor views are writable numpy arrays (no warnings from torch.from_numpy),
        # shared with the page cache and never written back
        return GGUFReader(path, "c")
    except Exception as e:  # gguf's parser raises bare ValueError / IndexError on damaged headers
        raise ModelFileError(f"{path}: truncated or corrupt GGUF header ({type(e).__name__}: {e})") from None


def _split_key(f: ModelFile, key: str):
    field = f.reader.fields.get(key)
    try:
        return keys.read({key: field.contents()} if field is not None else {}, key)
    except keys.ConfigError as e:
        raise ModelFileError(f"{f.path}: {e}") from None

"""Rewrites a GGUF file with some tensors replaced: for tests that need types our writer never makes."""

from __future__ import annotations

import gguf
import numpy as np


def rewrite_gguf(
    source: str,
    target: str,
    replace: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]],
    shards: int = 1,
):
    """Copies every key and tensor of `source` to `target`, except tensors named in `replace`, which are
    written as the given raw bytes (rows, bytes per row) of the given type. With shards > 1, gguf-split's
    shards TARGET-00001-of-0000N.gguf ... (gguf-py's splitting writer); returns the first one's path."""
    reader = gguf.GGUFReader(source)
    per_shard = -(-len(reader.tensors) // shards) if shards > 1 else 0
    writer = gguf.GGUFWriter(
        target, str(reader.fields["general.architecture"].contents()), split_max_tensors=per_shard
    )
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture")):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_array(field.name, field.contents())
        else:
            writer.add_key_value(field.name, field.contents(), field.types[0])
    for t in reader.tensors:
        if t.name in replace:
            raw, qtype = replace[t.name]
            writer.add_tensor(t.name, raw, raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, np.array(t.data).reshape([int(d) for d in reversed(t.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if shards == 1:
        return target
    from mlapipe.runtime.gguf_shards import shard_path

    return shard_path(target[: -len(".gguf")], 0, shards)

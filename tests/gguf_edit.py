"""Rewrites a GGUF file with some tensors replaced: for tests that need types our writer never makes."""

from __future__ import annotations

import gguf
import numpy as np


def rewrite_gguf(source: str, target: str, replace: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]):
    """Copies every key and tensor of `source` to `target`, except tensors named in `replace`, which are
    written as the given raw bytes (rows, bytes per row) of the given type."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, str(reader.fields["general.architecture"].contents()))
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
    return target

"""mlapipe: DeepSeek-V2/V3/R1 (MLA + MoE) inference from GGUF files, pipelined over GPUs with Ray.

`from mlapipe import Engine, SamplingParams`. The names load on first use, so that importing
`mlapipe.kernels.*` (in a stage process, or a kernel benchmark) does not import the driver.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mlapipe")
except PackageNotFoundError:  # running from a checkout that was not installed
    __version__ = "0+unknown"

_PUBLIC = {
    "Engine": "mlapipe.runtime.engine",
    "PromptError": "mlapipe.runtime.engine",
    "RequestFailed": "mlapipe.runtime.engine",
    "RequestOutput": "mlapipe.runtime.engine",
    "ModelFileError": "mlapipe.runtime.gguf_model",
    "SamplingParams": "mlapipe.runtime.sampling_params",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'mlapipe' has no attribute {name!r}")

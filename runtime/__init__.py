"""mlapipe driver: config, GGUF loading, tokenizer, planner, scheduler, engine, metrics, CLI."""

from mlapipe.runtime.engine import Engine, PromptError, RequestFailed, RequestOutput
from mlapipe.runtime.gguf_model import ModelFileError
from mlapipe.runtime.sampling_params import SamplingParams

__all__ = ["Engine", "ModelFileError", "PromptError", "RequestFailed", "RequestOutput", "SamplingParams"]

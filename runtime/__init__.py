"""mlapipe driver: config, GGUF loading, tokenizer, planner, scheduler, engine, metrics, CLI."""

from runtime.engine import Engine, PromptError, RequestFailed, RequestOutput
from runtime.gguf_model import ModelFileError
from runtime.sampling_params import SamplingParams

__all__ = ["Engine", "ModelFileError", "PromptError", "RequestFailed", "RequestOutput", "SamplingParams"]

"""HF transformers reference models built from the same seeded weights we write to GGUF."""

from __future__ import annotations

import gguf
import numpy as np
import torch

from mlapipe.runtime.gguf_writer import WEIGHT_TYPES


def hf_model(cfg: dict, state_dict: dict[str, np.ndarray]):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    is_v3 = cfg.get("topk_method") == "noaux_tc"
    config_cls, model_cls = (
        (DeepseekV3Config, DeepseekV3ForCausalLM) if is_v3 else (DeepseekV2Config, DeepseekV2ForCausalLM)
    )
    hf_cfg = config_cls(**cfg)
    hf_cfg._attn_implementation = "eager"
    model = model_cls(hf_cfg).eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, as ignore_eos does
    model.generation_config.pad_token_id = 0
    return model


def quantized_state_dict(state_dict: dict[str, np.ndarray], weight_type: str) -> dict[str, np.ndarray]:
    """The weights as a GGUF of `weight_type` holds them: quantized and dequantized with gguf's own code,
    for exactly the tensors our writer quantizes (2-D+ weights other than the router)."""
    qtype = WEIGHT_TYPES[weight_type]
    out = {}
    for name, array in state_dict.items():
        if array.ndim >= 2 and not name.endswith("mlp.gate.weight") and weight_type != "F32":
            array = gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype).reshape(array.shape)
        out[name] = np.asarray(array, dtype=np.float32)
    return out


@torch.no_grad()
def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([token_ids])).logits[0].float()

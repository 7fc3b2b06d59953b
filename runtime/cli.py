"""mlapipe command line: generate | inspect."""

from __future__ import annotations

import argparse
import sys


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt, streaming it")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-m", "--model", help="GGUF file")
    src.add_argument(
        "--demo", action="store_true", help="a tiny random DeepSeek-V3-style model, built on first use"
    )
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("-n", "--max-tokens", type=int, default=64)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context length (n_ctx)")
    p.add_argument("--amb", type=float, default=0.0, help="attention max batch in MiB (0 = unlimited)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print a GGUF model's config, tensor types and sizes")
    p.add_argument("-m", "--model", required=True)


def cmd_generate(args) -> int:
    from runtime.engine import Engine
    from runtime.sampling_params import SamplingParams
    from runtime.tiny_models import demo_model_path

    path = demo_model_path() if args.demo else args.model
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temp, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    with Engine(path, n_ctx=args.ctx_size, amb=args.amb) as engine:
        prompt = args.prompt
        if args.chat:
            prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        print(prompt, end="", flush=True)
        count = 0
        for event in engine.stream(prompt, params):
            print(event.text, end="", flush=True)
            count += 1
        print(f"\n[{count} tokens, model {path}]", file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    from runtime.gguf_model import GGUFModel

    model = GGUFModel(args.model)
    cfg = model.config
    print(f"model: {model.path}")
    print(f"architecture: deepseek2, MLA layout: {model.mla_layout}")
    for name, value in cfg.describe():
        print(f"  {name:26s} {value}")
    print("tensor types:")
    for qtype, (count, size) in sorted(model.type_summary().items()):
        print(f"  {qtype:6s} {count:5d} tensors {size / 2**20:12.2f} MiB")
    print(f"parameters: {model.num_parameters:,}")
    for dtype, size in (("bf16/f16", 2), ("f32", 4)):
        per_token = cfg.latent_kv_bytes_per_token(size)
        print(
            f"latent KV per token ({dtype}): {per_token:,} bytes "
            f"({cfg.num_layers} layers x {cfg.latent_dim} x {size}); "
            f"n_ctx {cfg.context_length}: {per_token * cfg.context_length / 2**30:.2f} GiB"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mlapipe", description="DeepSeek MLA + MoE inference from GGUF files"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_inspect(sub)
    args = parser.parse_args(argv)
    from runtime.engine import PromptError
    from runtime.gguf_model import ModelFileError
    from runtime.tokenizer import TokenizerError

    try:
        return {"generate": cmd_generate, "inspect": cmd_inspect}[args.command](args)
    except (ModelFileError, PromptError, TokenizerError, ValueError) as e:
        print(f"mlapipe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

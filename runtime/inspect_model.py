"""`mlapipe inspect`: a GGUF model's (or a named shape's) config, tensor types and sizes, the tensors
that load as BF16 for want of a kernel, the latent KV per token, and with --pipeline the memory plan of N
stages and each stage's weights by type."""

from __future__ import annotations

from mlapipe.runtime import arg_types
from mlapipe.runtime.engine_args import DEFAULT_UBATCH
from mlapipe.runtime.shapes import SHAPES


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="print a GGUF model's config, tensor types and sizes")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-m", "--model", help="GGUF file")
    src.add_argument("--demo", action="store_true", help="the tiny random demo model")
    src.add_argument("--shape", choices=sorted(SHAPES), help="a named model shape (random weights)")
    p.add_argument("--layers", type=arg_types.int_at_least(1), default=None, help="layers of the named shape")
    p.add_argument("--wtype", default=None, help="weight type or recipe of the named shape (default BF16)")
    p.add_argument(
        "--pipeline", type=arg_types.int_at_least(1), default=None, help="also print the memory plan of N stages"
    )
    p.add_argument(
        "--device-memory",
        type=arg_types.parse_bytes,
        default=None,
        help="plan for devices of this size (e.g. 139GiB), sizing the KV cache from memory",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="fraction of each device's memory for weights, compute and KV cache (default 0.9)",
    )
    p.add_argument(
        "--amb", type=arg_types.amb_values, default=0.0, help="attention max batch in MiB, or one per stage"
    )
    p.add_argument(
        "--ubatch",
        type=arg_types.int_at_least(1),
        default=DEFAULT_UBATCH["cuda"],
        help="tokens per micro-batch (default: the engine's on a GPU)",
    )
    p.add_argument("-c", "--ctx-size", type=arg_types.int_at_least(2), default=None, help="context length (n_ctx)")
    p.add_argument("--split", type=arg_types.float_list, default=None, help="layer proportions per stage, e.g. 3,1")


def run(args) -> int:
    from mlapipe.runtime.gguf_model import GGUFModel
    from mlapipe.runtime.shapes import RandomModel, random_spec
    from mlapipe.runtime.tiny_models import demo_model_path

    if args.model or args.demo:
        model = GGUFModel(demo_model_path() if args.demo else args.model)
    else:
        model = RandomModel(random_spec(args.shape, args.layers, wtype=args.wtype))
    cfg = model.config
    print(f"model: {model.path}")
    paths = getattr(model, "paths", [model.path])
    if len(paths) > 1:
        print(f"shards: {len(paths)} ({paths[0]} ... {paths[-1]})")
    layout = model.mla.describe() if hasattr(model, "mla") else model.mla_layout
    print(f"architecture: deepseek2, MLA layout: {layout}")
    for name, value in cfg.describe():
        print(f"  {name:26s} {value}")
    print("tensor types:")
    for qtype, (count, size) in sorted(model.type_summary().items()):
        print(f"  {qtype:6s} {count:5d} tensors {size / 2**20:12.2f} MiB")
    print(f"parameters: {model.num_parameters:,}")
    _print_fallback(model)
    for dtype, size in (("bf16/f16", 2), ("f32", 4)):
        per_token = cfg.latent_kv_bytes_per_token(size)
        print(
            f"latent KV per token ({dtype}): {per_token:,} bytes "
            f"({cfg.num_layers} layers x {cfg.latent_dim} x {size}); "
            f"n_ctx {cfg.context_length}: {per_token * cfg.context_length / 2**30:.2f} GiB"
        )
    if args.pipeline is not None:
        _print_plan(model, args)
    return 0


def _print_plan(model, args) -> None:
    from mlapipe.runtime.planner import (
        DEFAULT_KV_MEMORY_FRACTION,
        PlanError,
        has_quantized_experts,
        layer_weight_bytes,
        plan_for_model,
        plan_kv_from_memory,
        stage_tensor_names,
    )
    from mlapipe.runtime.weight_storage import bytes_by_type

    cfg = model.config
    # What Engine allocates by default: n_ctx 4096 capped by the trained context, and KV blocks of
    # 64 tokens for 4 sequences of n_ctx (runtime/engine.py), or the cache sized from the devices'
    # memory; keep the two in step.
    n_ctx = min(args.ctx_size or 4096, cfg.context_length)
    options = dict(split=args.split, amb_mib=args.amb, ubatch=args.ubatch, n_ctx=n_ctx)
    if args.device_memory is None:
        kv_tokens = 4 * -(-n_ctx // 64) * 64
        plan = plan_for_model(model, args.pipeline, num_kv_tokens=kv_tokens, **options)
        print(
            f"pipeline plan (n_ctx {n_ctx}, KV cache {kv_tokens} tokens, ubatch {args.ubatch}, "
            "bf16 weights and KV):"
        )
    else:
        fraction = args.gpu_memory_utilization or DEFAULT_KV_MEMORY_FRACTION
        layers, embed, head = layer_weight_bytes(model)
        try:
            plan = plan_kv_from_memory(
                cfg,
                layers,
                embed,
                head,
                args.pipeline,
                total_bytes=[args.device_memory] * args.pipeline,
                device_names=[
                    f"device {i} ({args.device_memory / 2**30:.2f} GiB)" for i in range(args.pipeline)
                ],
                kv_memory_fraction=fraction,
                quantized_experts=has_quantized_experts(model),
                **options,
            )
        except PlanError as e:
            raise ValueError(f"{model.path} on {args.pipeline} device(s): {e}") from None
        print(
            f"pipeline plan ({args.pipeline} x {args.device_memory / 2**30:.2f} GiB at {fraction:g}, n_ctx {n_ctx}, "
            f"ubatch {args.ubatch}, KV cache sized from memory, bf16 KV):"
        )
    print(plan.format())
    print("weights per device by type (as loaded):")
    for stage in plan.stages:
        names = stage_tensor_names(model, stage)
        table = bytes_by_type(model.tensors, names, 2)
        cells = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in sorted(table.items(), key=lambda kv: -kv[1]))
        print(f"  stage {stage.stage}: {cells}")


def _print_fallback(model) -> None:
    from mlapipe.runtime.weight_storage import fallback_tensors

    fallback = fallback_tensors(model.tensors)
    if fallback:
        kinds = sorted({model.tensors[n].qtype.name for n in fallback})
        print(
            f"quantized tensors loaded as BF16 ({', '.join(kinds)}: no kernel, or an expert stack with a "
            f"dense member): {len(fallback)}, e.g. {', '.join(fallback[:4])}"
        )

#!/usr/bin/env bash
# One GPU-machine call: GPU/multi-GPU tests, then the pipeline benchmarks; short tables last.
# Run from the repository root of a GPU machine (README, "GPU runs"); wheels in .whl/ are installed first.
#   bash tests/gpu_check_and_bench.sh [tests|single|pipeline|decode|rounds|two-stage|profile|tests+profile|benches|all|quant|planes-kernels|planes-model|prefill-graphs|prefill-profile|quant-tests|moe-tiles|pdl|decode-fusions|fusion-kernels|quant-decode-kernels|v3-2gpu|v3-4gpu|load]
set -u
if compgen -G ".whl/*.whl" > /dev/null; then  # an offline GPU machine: wheels carried in .whl/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && mkdir -p /tmp/pyroot && ln -sfn "$PWD" /tmp/pyroot/mlapipe \
    && export PYTHONPATH=/tmp/site:/tmp/pyroot || exit 1
fi  # else: the environment as installed (pip install -e '.[dev]')
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
what=${1:-all}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
bench() { python -m mlapipe.runtime.cli bench --shape v2-lite -r 2 "$@" 2>&1 | grep -v -i "token authentication"; }
if [[ $what == tests || $what == all || $what == tests+profile ]]; then
  python3 -m pytest -q tests/test_norm_rope_kernels.py 2>&1 | tail -3 | tee "$out/norm_rope_tests.log"
  python3 -m pytest -q -m gpu tests/test_moe_kernels.py tests/test_router_kernel.py 2>&1 | tail -3 | tee "$out/moe_tests.log"
  python3 -m pytest -q -m "gpu or multigpu" tests/test_gpu_model.py 2>&1 | tail -15 | tee "$out/gpu_tests.log"
fi
if [[ $what == load ]]; then  # a 16.8 GB V2-Lite Q8_0 file in ik's layout: load time, then mlapipe bench -m
  f=/tmp/v2lite-q8_0-ik.gguf
  python3 tests/gpu_load_bench.py --out $f --keep 2>&1 | tee "$out/load_bench.log"
  python3 tests/gpu_load_bench.py --out $f --reuse --dequantize --bench 2>&1 | tee -a "$out/load_bench.log"
fi
if [[ $what == single || $what == all || $what == benches ]]; then
  bench -p 512,2048,8192 -n 128 -gp 4096,128 | tee "$out/bench_single.log"  # the engine's default ubatch
fi
if [[ $what == pipeline || $what == all || $what == benches ]]; then
  bench -p 2048 -n 0 --concurrent 8 --pipeline 1,2 -ub 2048 -r 5 --timeline | tee "$out/bench_prefill_pipeline.log"
  bench -p 0 -n 128 --concurrent 64 --pipeline 1,2 | tee "$out/bench_decode_pipeline.log"
fi
if [[ $what == decode ]]; then
  python3 -m pytest -q -m "gpu or multigpu" tests/test_gpu_model.py 2>&1 | tail -3
  bench -p 0 -n 128 --concurrent 64 --pipeline 1,2 | tee "$out/bench_decode_pipeline.log"
  bench -p 0 -n 128 -gp 4096,128 | tee "$out/bench_tg_single.log"
fi
if [[ $what == rounds ]]; then
  python3 -m pytest -q -m "gpu or multigpu" tests/test_gpu_model.py 2>&1 | tail -3
  bench -p 0 -n 128 --concurrent 64 --pipeline 1,2 --decode-steps 1,16 | tee "$out/bench_decode_rounds.log"
  bench -p 0 -n 128 --concurrent 128,256 --pipeline 1,2 | tee "$out/bench_decode_concurrency.log"
fi
if [[ $what == two-stage ]]; then
  bench -p 512,2048,8192 -n 128 -gp 4096,128 -ub 2048 --pipeline 2 | tee "$out/bench_two_stage.log"
fi
if [[ $what == profile || $what == tests+profile ]]; then
  for seqs in 1 64; do
    python -m mlapipe.workers.bench.profile_decode --seqs $seqs > "$out/profile_decode_$seqs.log" 2>&1
    grep -v -i "token authentication" "$out/profile_decode_$seqs.log" | grep -A 14 "decode steps of"
  done
fi
if [[ $what == prefill-graphs ]]; then  # issue 18: prefill micro-batches replayed from CUDA graphs
  python3 -m pytest -q -m gpu tests/test_prefill_graphs.py 2>&1 | tail -5 | tee "$out/prefill_graph_tests.log"
  python3 -m pytest -q tests/test_mla_kernels.py 2>&1 | tail -3 | tee -a "$out/prefill_graph_tests.log"
  python3 -m pytest -q -m "gpu or multigpu" tests/test_gpu_model.py 2>&1 | tail -3 | tee -a "$out/prefill_graph_tests.log"
  MLAPIPE_PREFILL_GRAPHS=0 bench -p 512,2048,8192 -n 128 -ub 2048 | tee "$out/bench_prefill_eager.log"
  bench -p 512,2048,8192 -n 128 -ub 2048 | tee "$out/bench_prefill_graphs.log"
  bench -p 0 -n 128 | tee "$out/bench_tg_small_context.log"  # tg128 at a small n_ctx, beside the 8k one above
  python -m mlapipe.kernels.bench attention --prefill > "$out/attention_prefill.log" 2>&1
  tail -16 "$out/attention_prefill.log"
fi
if [[ $what == prefill-profile ]]; then  # where a graphed prompt's GPU time goes; micro-batch sizes for pp8192
  for tokens in 512 2048; do
    python -m mlapipe.workers.bench.profile_prefill --tokens $tokens > "$out/profile_prefill_$tokens.log" 2>&1
    grep -v -i "token authentication" "$out/profile_prefill_$tokens.log" | grep -B 3 -A 25 "GPU time per"
  done
  bench -p 8192 -n 0 -ub 2048,4096,8192 | tee "$out/bench_pp8192_ubatch.log"
fi
if [[ $what == quant ]]; then
  # kept-quantized model vs dequantized on the GPU, then V2-Lite random weights in bf16, Q8_0 and Q4_K in one
  # run: per type the memory lines (weights planned = quantized bytes, allocated after load) and pp/tg rows
  python3 -m pytest -q -m gpu tests/test_quant_model.py 2>&1 | tail -3 | tee "$out/quant_model_tests.log"
  bench -p 2048 -n 128 --wtype bf16,q8_0,q4_k | tee "$out/bench_quant_v2_lite.log"
  for wtype in q8_0 q4_k; do  # where a quantized decode step's time goes, kernel by kernel
    python -m mlapipe.workers.bench.profile_decode --seqs 1 --wtype $wtype > "$out/profile_decode_$wtype.log" 2>&1
    grep -v -i "token authentication" "$out/profile_decode_$wtype.log" | grep -A 14 "decode steps of"
  done
fi
if [[ $what == planes-kernels ]]; then  # Q8_0 planes (kernels/quant/planes.py): bits, then file vs planes kernels
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_quant_planes.py tests/test_quant_linear.py \
    tests/test_quant_moe.py -k "planes or Q8_0" 2>&1 | tail -4 | tee "$out/planes_tests.log"
  timeout 330 python3 -m mlapipe.kernels.bench quant --types q8_0 --models v2-lite,v3 --moe-prefill 2048,8192 \
    > "$out/bench_planes_kernels.log" 2>&1; grep -v "^\['" "$out/bench_planes_kernels.log" | tail -60
fi
if [[ $what == planes-model ]]; then  # end to end V2-Lite: bf16, Q8_0 planes (default), Q8_0 in the file's layout
  bench -p 2048 -n 128 --wtype bf16,q8_0 | tee "$out/bench_planes_model.log"
  MLAPIPE_QUANT_LAYOUT=file bench -p 2048 -n 128 --wtype q8_0 | tee "$out/bench_file_model.log"
  python -m mlapipe.workers.bench.profile_decode --seqs 1 --wtype q8_0 > "$out/profile_decode_planes.log" 2>&1
  grep -v -i "token authentication" "$out/profile_decode_planes.log" | grep -A 14 "decode steps of"
fi
if [[ $what == moe-tiles ]]; then  # issue 18: the bf16 MoE's row tile at V2-Lite pp2048 (192 rows an expert)
  timeout 150 python3 -m mlapipe.kernels.bench moe --sweep --sweep-tokens 2048 --models v2-lite --tokens 1 \
    --no-variant > "$out/moe_tiles_sweep.log" 2>&1; grep "^\['v2-lite'" "$out/moe_tiles_sweep.log"
  bench -p 512,2048 -n 0 | tee "$out/bench_moe_tiles.log" | grep "^| v2"
  for config in 64,128,64,4,4 64,64,128,4,4; do
    MLAPIPE_MOE_CONFIG=$config bench -p 512,2048 -n 0 | tee -a "$out/bench_moe_tiles.log" | grep "^| v2" | sed "s/^/$config /"
  done
fi
if [[ $what == quant-tests ]]; then  # the quantized kernels' GPU tests, then the model and prefill-graph ones
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_quant_linear.py tests/test_quant_moe.py \
    tests/test_quant_planes.py 2>&1 | tail -3 | tee "$out/quant_tests.log"
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m "gpu or multigpu" tests/test_quant_model.py \
    tests/test_prefill_graphs.py tests/test_gpu_model.py 2>&1 | tail -3 | tee -a "$out/quant_tests.log"
fi
if [[ $what == pdl ]]; then  # programmatic dependent launch (kernels/pdl.py): on vs off in one run, then bits
  python3 -c "import torch, triton; from mlapipe.kernels.pdl import launch_options; print('triton', triton.__version__, dict(launch_options(torch.device('cuda'))))"
  for pdl in 0 1; do
    MLAPIPE_PDL=$pdl timeout 200 python -m mlapipe.runtime.cli bench --shape v2-lite -r 2 -p 512,2048 -n 128 \
      --wtype bf16,q8_0 > "$out/bench_pdl_$pdl.log" 2>&1; grep "^| v2" "$out/bench_pdl_$pdl.log" | sed "s/^/PDL=$pdl /"
  done
  python -m mlapipe.workers.bench.profile_decode --seqs 1 --wtype q8_0 > "$out/profile_decode_pdl.log" 2>&1
  grep -A 40 "decode steps of" "$out/profile_decode_pdl.log"
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m "gpu or multigpu" tests/test_gpu_model.py \
    tests/test_prefill_graphs.py tests/test_quant_model.py 2>&1 | tail -3 | tee "$out/pdl_tests.log"
fi
if [[ $what == decode-fusions ]]; then  # issue 12: fewer decode kernels; speed first, then bits, then where time goes
  timeout 200 python -m mlapipe.runtime.cli bench --shape v2-lite -r 2 -p 512,2048 -n 128 --wtype bf16,q8_0,q4_k \
    > "$out/bench_fusions.log" 2>&1; grep "^| v2" "$out/bench_fusions.log"
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m "gpu or multigpu" tests/test_gpu_model.py \
    tests/test_prefill_graphs.py tests/test_quant_model.py 2>&1 | tail -3 | tee "$out/fusion_model_tests.log"
  for wtype in q4_k q8_0; do  # kernel times without PDL's overlap (with it a kernel's span includes its wait)
    MLAPIPE_PDL=0 timeout 50 python -m mlapipe.workers.bench.profile_decode --seqs 1 --wtype $wtype > "$out/profile_$wtype.log" 2>&1
    grep -A 24 "decode steps of" "$out/profile_$wtype.log" | cut -c1-100
  done
  # the MoE's walked launch at decode (no partials, no combine kernels) against the split one above
  MLAPIPE_PDL=0 MLAPIPE_QUANT_MOE_SPLIT=0 timeout 50 python -m mlapipe.workers.bench.profile_decode --seqs 1 --wtype q8_0 \
    > "$out/profile_q8_0_walked.log" 2>&1; grep -A 12 "decode steps of" "$out/profile_q8_0_walked.log" | cut -c1-100
fi
if [[ $what == fusion-kernels ]]; then  # the fused decode kernels' GPU tests (bits against the kernels they replace)
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_mla_absorb_kernel.py tests/test_mla_decode_projected.py \
    tests/test_norm_rope_kernels.py tests/test_quant_moe.py tests/test_pdl.py tests/test_moe_route_align.py \
    tests/test_shared_mlp_partials.py tests/test_silu_mul_kernel.py tests/test_attention_partials.py \
    tests/test_quant_decoders.py tests/test_quant_linear.py -k "not other_types" 2>&1 | tail -4 | tee "$out/fusion_kernel_tests.log"
  for tokens in 512 2048; do  # where a quantized prompt's GPU time goes (the pp gap to bf16)
    timeout 60 python -m mlapipe.workers.bench.profile_prefill --tokens $tokens --wtype q8_0 > "$out/profile_prefill_q8_0_$tokens.log" 2>&1
    grep -A 25 "GPU time per" "$out/profile_prefill_q8_0_$tokens.log" | cut -c1-110
  done
fi
if [[ $what == quant-decode-kernels ]]; then  # issue 12's kernel bars at decode sizes, every type with a split decoder
  # (the whole decoders' baseline: the same bench with MLAPIPE_QUANT_PREFETCH=0, a call of its own)
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_quant_decoders.py -k split_decoder 2>&1 | tail -2  # compiled PTX = gguf
  types=q8_0,q4_k,q5_k,q2_k,q6_k,q3_k,q5_0,iq4_nl,q4_0
  timeout 420 python3 -m mlapipe.kernels.bench quant --types $types --models v2-lite,v3 --dense-prefill "" --moe-prefill "" \
    --layouts planes > "$out/bench_quant_decode.log" 2>&1
  grep -v "^\['" "$out/bench_quant_decode.log" | tail -70
fi
v3() { python -m mlapipe.runtime.cli bench --shape v3 -r 1 "$@" 2>&1 | grep -v -i "token authentication"; }
if [[ $what == v3-2gpu ]]; then  # nvidia-h200-x2: the UD-Q2_K_XL-like mix over 2 stages (issue 13)
  python -m mlapipe.runtime.cli inspect --shape v3 --wtype UD-Q2_K_XL --pipeline 2 --device-memory 139GiB | tail -10
  v3 --wtype UD-Q2_K_XL --pipeline 2 -p 2048 -n 128 --concurrent 1,64 | tee "$out/bench_v3_q2_2stage.log"
  v3 --wtype UD-Q2_K_XL --pipeline 2 -p 0 -n 0 -gp 16384,128 | tee "$out/bench_v3_q2_2stage_depth.log"
fi
if [[ $what == v3-4gpu ]]; then  # nvidia-h200-x4: the Q4_K_M-like mix over 4 stages (issue 19), NCCL then gRPC
  python -m mlapipe.runtime.cli inspect --shape v3 --wtype Q4_K_M --pipeline 4 --device-memory 139GiB | tail -12
  v3 --wtype Q4_K_M --pipeline 4 -p 2048 -n 128 --concurrent 1,64 | tee "$out/bench_v3_q4km_4stage.log"
  v3 --wtype Q4_K_M --pipeline 4 -p 2048 -n 128 --concurrent 1,64 --transport grpc | tee "$out/bench_v3_q4km_4stage_grpc.log"
fi

"""GGUF block formats on the GPU: one small decoder per type (+ its torch reference), one table, and
shared kernels (dequantize, dense linear, fused MoE, embedding gather) that take the decoder as a
constexpr. See kernels/quant/tensor.py for the storage contract."""

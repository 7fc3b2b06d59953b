"""How a stage hands its hidden state to the next one, and the last stage its tokens to the first.

Every transport offers `send(key, tensor)` to the next stage and `recv(key, shape, dtype)` from the
previous one, plus `send_back` / `recv_back` from the last stage to the first (the sampled tokens of
a decode round's steps), and gives identical bytes. A key names one step of one micro-batch. Ray
carries control messages only.
- "nccl" / "gloo": torch.distributed point-to-point, NCCL between GPUs, gloo on CPU;
- "grpc": client streams of ~1 MiB raw-byte chunks, for links without NCCL.
"""

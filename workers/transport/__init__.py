"""How a stage hands its hidden state to the next one.

Every transport offers `send(batch_id, tensor)` to the next stage and `recv(batch_id, shape, dtype)`
from the previous one, and gives identical bytes. Ray carries control messages only.
- "nccl" / "gloo": torch.distributed point-to-point, NCCL between GPUs, gloo on CPU;
- "grpc": client streams of ~1 MiB raw-byte chunks, for links without NCCL.
"""

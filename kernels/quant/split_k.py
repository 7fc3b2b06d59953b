"""Split-K without a second launch: the chunk program that finishes an output tile last sums it.

A decode-sized GEMM cuts K into fixed chunks (linear.plan_linear) so that every SM streams weights; each
chunk program writes its fp32 partial. The partials used to be added by a kernel of their own (one more
launch and one more pass a GEMM, ~2-7 us each, some 130 a V2-Lite decode step). Instead every chunk
program, after storing its partial, takes a ticket from a counter of its output tile; the one that draws
the last ticket reads all the tile's partials back and adds them in chunk order from a zero total,
exactly the sum the separate kernel did, so the bits do not change (no atomic ever adds a value).

Memory order is the CUDA threadfence-reduction pattern: a CTA barrier after the partial stores, then one
acquire-release atomic at GPU scope (release: the CTA's stores are visible before the ticket; acquire:
the last program sees every other program's stores), and the partials are read back through L2 only.
The last program puts the counter back to zero, so the counters (QuantTensor.arrival_counters) are
ready for the next launch, CUDA-graph replays included.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def arrived_last(counter_ptr, num_chunks):
    """After a program has stored its chunk's partial of a tile whose counter is at counter_ptr: True in
    the one program of the tile's num_chunks that arrives last (it then owns the sum)."""
    tl.debug_barrier()  # every thread of the program has issued its partial stores
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = ticket == num_chunks - 1
    if last:
        tl.store(counter_ptr, 0)  # every other chunk has arrived: nobody else touches it this launch
    return last

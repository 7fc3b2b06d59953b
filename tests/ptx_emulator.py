"""A few PTX instructions in numpy, to run an inline-asm convert's PTX on the CPU (no GPU here): the
interpreter tests run a split convert's Triton-op twin, this checks that the PTX computes the same.
Operands are $n, named .reg registers, hex or decimal immediates and 0f float bits; every register is a
uint32 numpy array (elementwise over the inputs)."""

from __future__ import annotations

import numpy as np


def _prmt(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """prmt.b32 in its default mode: byte i of the result is byte (c >> 4i) & 7 of {b, a}, or that byte's
    sign bit replicated where bit 3 of the selector is set."""
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = np.zeros_like(a)
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = np.choose(sel & 7, src)
        byte = np.where(sel & 8, np.where(byte & 0x80, 0xFF, 0), byte).astype(np.uint32)
        out |= byte << np.uint32(8 * i)
    return out


def _sub_f32(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.view(np.float32) - b.view(np.float32)).view(np.uint32)


_OPS = {
    "and.b32": lambda a, b: a & b,
    "or.b32": lambda a, b: a | b,
    "xor.b32": lambda a, b: a ^ b,
    "shr.b32": lambda a, b: np.where(b < 32, a >> np.minimum(b, 31), 0).astype(np.uint32),
    "shl.b32": lambda a, b: np.where(b < 32, a << np.minimum(b, 31), 0).astype(np.uint32),
    "prmt.b32": _prmt,
    "sub.f32": _sub_f32,
}


def run_ptx(asm: str, inputs: dict[int, np.ndarray], outputs: int) -> list[np.ndarray]:
    """Runs `asm` with operands $outputs.. set from `inputs` ({operand number: uint32 values}); returns the
    values of $0 .. $outputs-1."""
    shape = np.broadcast_shapes(*(np.shape(v) for v in inputs.values()))
    regs: dict[str, np.ndarray] = {
        f"${n}": np.broadcast_to(np.asarray(v, np.uint32), shape) for n, v in inputs.items()
    }

    def value(token: str) -> np.ndarray:
        if token in regs:
            return regs[token]
        if token.startswith("0f"):
            token = "0x" + token[2:]
        return np.full(shape, int(token, 0), np.uint32)

    for line in asm.replace("{", "").replace("}", "").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dest, *args = (a.strip() for a in rest.split(","))
        regs[dest] = _OPS[op](*(value(a) for a in args)).astype(np.uint32)
    return [regs[f"${n}"] for n in range(outputs)]

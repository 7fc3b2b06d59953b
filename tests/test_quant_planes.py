"""Q8_0 planes (kernels/quant/planes.py): the loader's repacking is lossless, its decoder bit-exact with
gguf's numpy dequantization, and the GEMMs over planes give the file layout's bits; the loader repacks
only on a GPU. Without a GPU the Triton kernels run in the interpreter (fp16/fp32 only)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mlapipe.kernels.quant import planes  # noqa: E402
from mlapipe.kernels.quant.dequantize import dequantize  # noqa: E402
from mlapipe.kernels.quant.fused_moe import PATH_ENV, quant_fused_moe  # noqa: E402
from mlapipe.kernels.quant.linear import linear_plan, linear_split, linear_tiled, quant_linear  # noqa: E402
from mlapipe.kernels.quant.random_blocks import random_quant_tensor  # noqa: E402
from mlapipe.kernels.quant.reference import dequantize_rows  # noqa: E402
from mlapipe.kernels.quant.tensor import QuantTensor  # noqa: E402
from mlapipe.kernels.quant.types import Q8_0_PLANES, quant_type  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
Q8_0 = int(gguf.GGMLQuantizationType.Q8_0)
# random scales include inf and NaN: numpy (gguf) and the interpreter warn on their products
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:overflow encountered")


def adversarial_q8_0(rows: int, blocks: int, seed: int) -> np.ndarray:
    """uint8 (rows, blocks * 34): every byte random, so the fp16 scales take every pattern, inf, NaN,
    subnormals and -0 included (q * d is exact in fp32, so gguf's inf/NaN products are well defined)."""
    return np.random.default_rng(seed).integers(0, 256, (rows, blocks * 34), dtype=np.uint8)


def gguf_values(raw: np.ndarray) -> torch.Tensor:
    values = gguf.quants.dequantize(raw.reshape(-1, raw.shape[-1]), gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(np.ascontiguousarray(values)).reshape(*raw.shape[:-1], -1)


def as_tensor(raw: np.ndarray, device=DEVICE) -> QuantTensor:
    data = torch.from_numpy(raw.copy()).to(device)
    return QuantTensor(data, Q8_0, (*raw.shape[:-1], raw.shape[-1] // 34 * 32))


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Every value's bits equal, except that a NaN matches any NaN: x86 keeps the scale's NaN payload
    through q * d, a GPU's multiply returns its one canonical NaN (a NaN scale decodes to NaN either way)."""
    got, want = got.float().cpu().contiguous(), want.float().cpu().contiguous()
    assert got.shape == want.shape, (got.shape, want.shape)
    differ = (got.view(torch.int32) != want.view(torch.int32)) & ~(got.isnan() & want.isnan())
    assert not differ.any(), f"{int(differ.sum())} of {differ.numel()} values differ"
    assert torch.equal(got.isnan(), want.isnan())


def test_pack_moves_the_bytes_and_unpack_restores_them():
    raw = adversarial_q8_0(2 * 16, 3, seed=1)
    w = as_tensor(raw, "cpu")
    packed = planes.pack(w)
    assert packed.qtype == Q8_0_PLANES and packed.shape == w.shape and packed.data.shape == w.data.shape
    assert torch.equal(w.data, torch.from_numpy(raw)), "pack must leave its input alone"
    group = packed.data[:16].reshape(-1)  # the first 16 rows: 16 x 96 quants, then 3 x 16 scales
    assert torch.equal(group[5 * 96 + 32 : 5 * 96 + 64], w.data[5, 36:68]), "row 5's second block of quants"
    assert torch.equal(group[16 * 96 + 2 * 16 * 1 + 2 * 7 :][:2], w.data[7, 34:36]), "row 7's second scale"
    assert torch.equal(planes.unpack(packed).data, w.data)
    in_place = planes.pack_in_place(as_tensor(raw, "cpu"))
    assert torch.equal(in_place.data, packed.data)


def test_reference_and_triton_decoders_equal_gguf():
    raw = adversarial_q8_0(3 * 16, 8, seed=2).reshape(3, 16, -1)  # an expert stack of 3
    want = gguf_values(raw)
    packed = planes.pack(as_tensor(raw))
    assert_bits_equal(dequantize_rows(packed.data, packed.qtype), want)
    for block_k in (32, 64, 256):  # the GEMMs' tiles and the dequantize kernel's widest
        assert_bits_equal(dequantize(packed, torch.float32, block_k=block_k), want)
    assert_bits_equal(dequantize(packed[1], torch.float32), want[1])  # an expert sliced out stays valid


@pytest.mark.parametrize("T", [1, 5, 17])
def test_linear_over_planes_gives_the_file_layouts_bits(T):
    w = random_quant_tensor((48, 256), Q8_0, 256**-0.5, "planes.w", device=DEVICE)
    packed = planes.pack(w)
    x = torch.randn(T, 256, device=DEVICE)
    plan = linear_plan(w, x.device)
    assert plan == linear_plan(packed, x.device)
    for launch in (linear_split, linear_tiled):
        assert torch.equal(launch(x, packed, plan), launch(x, w, plan)), launch.__name__
    torch.testing.assert_close(quant_linear(x, packed), x @ dequantize_rows(w.data, Q8_0).t())


@pytest.mark.parametrize("path", ["fused", "scratch"])
def test_moe_over_planes_gives_the_file_layouts_bits(path, monkeypatch):
    E, H, inter, T, K = 3, 64, 32, 4, 2
    gate_up = random_quant_tensor((E, 2 * inter, H), Q8_0, H**-0.5, "planes.gate_up", device=DEVICE)
    down = random_quant_tensor((E, H, inter), Q8_0, inter**-0.5, "planes.down", device=DEVICE)
    ids = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1]], device=DEVICE)
    weights = torch.rand(T, K, device=DEVICE)
    hidden = torch.randn(T, H, device=DEVICE)
    monkeypatch.setenv(PATH_ENV, path)
    want = quant_fused_moe(hidden, gate_up, down, weights, ids)
    got = quant_fused_moe(hidden, planes.pack(gate_up), planes.pack(down), weights, ids)
    assert torch.equal(got, want)


def test_the_loader_repacks_only_whole_groups_on_a_gpu(monkeypatch):
    w = random_quant_tensor((32, 64), Q8_0, 0.1, "planes.loader")
    assert planes.for_gemm(w) is w, "on the CPU the file's blocks stay"
    odd = random_quant_tensor((40, 64), Q8_0, 0.1, "planes.odd")
    assert not planes.packable(odd) and not planes.packable(random_quant_tensor((32, 256), 12, 0.1, "k"))
    with pytest.raises(AssertionError, match="not a packable Q8_0 tensor"):
        planes.pack(odd)
    assert quant_type(Q8_0_PLANES).step_bytes == 32 and quant_type(Q8_0).step_bytes == 34
    if torch.cuda.is_available():
        on_gpu = random_quant_tensor((32, 64), Q8_0, 0.1, "planes.loader", device="cuda")
        assert planes.for_gemm(on_gpu).qtype == Q8_0_PLANES
        monkeypatch.setenv(planes.LAYOUT_ENV, "file")
        kept = random_quant_tensor((32, 64), Q8_0, 0.1, "planes.loader", device="cuda")
        assert planes.for_gemm(kept) is kept


# GPU: the compiled kernels over planes at the model's shapes, bf16, every launch: the file layout's bits


@pytest.mark.gpu
@pytest.mark.parametrize("N, K", [(3072, 2048), (7168, 16384), (2048, 1408)])
def test_gpu_planes_linear_bits(N, K):
    w = random_quant_tensor((N, K), Q8_0, K**-0.5, "planes.gpu", device="cuda")
    packed = planes.pack(w)
    x = torch.randn(2048, K, device="cuda", dtype=torch.bfloat16)
    for T in (1, 16, 64, 2048):
        assert torch.equal(quant_linear(x[:T], packed), quant_linear(x[:T], w)), f"T={T}"
    assert_bits_equal(dequantize(packed, torch.float32), dequantize(w, torch.float32))


@pytest.mark.gpu
def test_gpu_planes_moe_bits():
    E, H, inter, K = 64, 2048, 1408, 6  # V2-Lite
    gate_up = random_quant_tensor((E, 2 * inter, H), Q8_0, H**-0.5, "planes.gate_up", device="cuda")
    down = random_quant_tensor((E, H, inter), Q8_0, inter**-0.5, "planes.down", device="cuda")
    packed_gate_up, packed_down = planes.pack(gate_up), planes.pack(down)
    hidden = torch.randn(4096, H, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(4096)]).cuda()
    weights = torch.rand(4096, K, device="cuda")
    for T in (1, 16, 512, 4096):
        want = quant_fused_moe(hidden[:T], gate_up, down, weights[:T], ids[:T])
        got = quant_fused_moe(hidden[:T], packed_gate_up, packed_down, weights[:T], ids[:T])
        assert torch.equal(got, want), f"T={T}"

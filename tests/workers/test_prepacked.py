"""Prepacked (oneDNN) linear weights give what the dense weight gives, for every layer kind."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.cpu_extension import DISABLE_ENV
from workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from workers.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from workers.layers.prepacked import EXACT_ROWS, can_prepack, linear, padded_rows, prepack, prepack_linears

pytestmark = pytest.mark.skipif(not can_prepack(torch.zeros(1, 1)), reason="oneDNN is not available on this build")

LAYER_TYPES = (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 64, 517])
@pytest.mark.parametrize("shape", [(24, 40), (1376, 256), (256, 688)])
def test_packed_linear_matches_dense(dtype: torch.dtype, rows: int, shape: tuple[int, int]) -> None:
    if not can_prepack(torch.zeros(1, 1, dtype=dtype)):
        pytest.skip(f"oneDNN has no {dtype} linear on this CPU")
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(shape, generator=generator).to(dtype)
    bias = torch.randn(shape[0], generator=generator).to(dtype)
    x = torch.randn(rows, shape[1], generator=generator).to(dtype)
    tolerance = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.3, "rtol": 2e-2}
    packed = prepack(weight)
    assert packed.is_mkldnn and packed.shape == weight.shape
    torch.testing.assert_close(linear(x, packed), F.linear(x, weight), **tolerance)
    torch.testing.assert_close(linear(x, packed, bias), F.linear(x, weight, bias), **tolerance)
    strided = torch.randn(rows, 2 * shape[1], generator=generator).to(dtype)[:, ::2]
    torch.testing.assert_close(linear(strided, packed), F.linear(strided, weight), **tolerance)


def test_row_counts_meet_few_sizes_with_little_padding() -> None:
    """oneDNN compiles and caches a kernel per row count: a step of any size up to 2,048 tokens meets one of
    72, each at most 1/8 more rows than it has (small batches run as they are)."""
    assert [padded_rows(rows) for rows in range(1, EXACT_ROWS + 1)] == list(range(1, EXACT_ROWS + 1))
    assert len({padded_rows(rows) for rows in range(1, 2049)}) == 72
    for rows in range(EXACT_ROWS + 1, 5000):
        assert rows <= padded_rows(rows) < rows + rows / 8
        assert padded_rows(padded_rows(rows)) == padded_rows(rows)


def _filled(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        param.data.copy_(torch.randn(param.shape, generator=generator))
    return module


def test_prepack_linears_packs_every_linear_kind_and_keeps_outputs() -> None:
    model = nn.ModuleDict({
        "qkv": _filled(QKVParallelLinear(32, 8, 4, 2, bias=True), 0),
        "column": _filled(ColumnParallelLinear(32, 48), 1),
        "row": _filled(RowParallelLinear(48, 32), 2),
        "embed": _filled(VocabParallelEmbedding(100, 32), 3),
        "head": ParallelLMHead(100, 32),
    })
    model["head"].weight = model["embed"].weight  # tied
    x, row_input, ids = torch.randn(5, 32), torch.randn(5, 48), torch.tensor([0, 7, 99])
    inputs = {"qkv": x, "column": x, "head": x, "row": row_input}
    dense = {name: model[name](inputs[name]) for name in inputs}
    embedded = model["embed"](ids)

    assert prepack_linears(model, LAYER_TYPES) == 4
    for name in ("qkv", "column", "row", "head"):
        assert model[name].weight.is_mkldnn
    assert not model["embed"].weight.is_mkldnn  # the tied embedding keeps its dense rows
    torch.testing.assert_close(model["embed"](ids), embedded, rtol=0, atol=0)
    for name in inputs:
        torch.testing.assert_close(model[name](inputs[name]), dense[name], atol=1e-4, rtol=1e-5)
    assert prepack_linears(model, LAYER_TYPES) == 0  # packing twice is a no-op


def test_disabled_cpu_kernels_keep_dense_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "0")
    layer = ColumnParallelLinear(8, 8)
    assert prepack_linears(layer, LAYER_TYPES) == 0 and not layer.weight.is_mkldnn

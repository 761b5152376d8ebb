"""Batched multi-LoRA ops: the torch path against a per-token oracle, the CPU kernel and the Triton
kernels against the torch path, and which backend a worker picks.

Triton runs interpreted on CPU in a subprocess: `triton.jit` fixes interpret mode when the
kernels are decorated, so setting `TRITON_INTERPRET` inside an already-importing process is
not reliable.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lora.ops import cpu_ops
from lora.ops.cpu_ops import CpuKernelBackend, KernelLoRAWeights
from lora.ops.metadata import LoRAStepMetadata
from lora.ops.selection import BACKEND_ENV, select_backend
from lora.ops.torch_ops import TorchBackend

REPO_ROOT = Path(__file__).resolve().parents[2]
NUM_SLOTS = 4
TORCH, KERNEL = TorchBackend(NUM_SLOTS), CpuKernelBackend(NUM_SLOTS)

# Slot per token (-1 = base model). Prefill: runs of one sequence's tokens, one longer than
# an SGMV tile (16) and a slot (0) used by two runs. Decode: one token per sequence.
SLOT_PATTERNS: dict[str, list[int]] = {
    "prefill": [0] * 5 + [-1] * 3 + [2] * 19 + [1] * 2 + [0] * 4,
    "decode": [3, 0, -1, 3, 1, 1, 2, -1, 0],
    "one_adapter": [-1, -1] + [1] * 7,
}
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def make_weights(
    num_tokens: int, in_features: int, out_features: int, rank: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, in], lora_a [S, rank, in], lora_b [S, out, rank], scaled so deltas stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, in_features, generator=gen)
    lora_a = torch.randn(NUM_SLOTS, rank, in_features, generator=gen) / in_features**0.5
    lora_b = torch.randn(NUM_SLOTS, out_features, rank, generator=gen) / rank**0.5
    return x.to(dtype), lora_a.to(dtype), lora_b.to(dtype)


def oracle_shrink(x: torch.Tensor, lora_a: torch.Tensor, slots: list[int]) -> torch.Tensor:
    buffer = torch.zeros(len(slots), lora_a.shape[1])
    for t, slot in enumerate(slots):
        if slot >= 0:
            buffer[t] = lora_a[slot].float() @ x[t].float()
    return buffer


def oracle_delta(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slots: list[int]
) -> torch.Tensor:
    buffer = oracle_shrink(x, lora_a, slots)
    delta = torch.zeros(len(slots), lora_b.shape[1])
    for t, slot in enumerate(slots):
        if slot >= 0:
            delta[t] = lora_b[slot].float() @ buffer[t]
    return delta


def in_kernel_layout(weights: torch.Tensor) -> torch.Tensor:
    """The same [slots, rows, cols] values, stored the way the CPU kernel backend stores slot buffers."""
    stored = CpuKernelBackend(weights.shape[0], weights.device).slot_weights(weights.shape[1], weights.shape[2], weights.dtype)
    return stored.copy_(weights)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol * 4, rtol=tol)


# ---------------------------------------------------------------------------- metadata


def test_metadata_cuts_segments_into_tiles_and_groups_rows_by_slot() -> None:
    meta = LoRAStepMetadata.build(torch.tensor(SLOT_PATTERNS["prefill"]), NUM_SLOTS)
    assert (meta.num_tokens, meta.num_lora_tokens) == (33, 30)
    assert meta.seg_starts.tolist() == [0, 8, 27, 29]
    assert meta.seg_lens.tolist() == [5, 19, 2, 4]
    assert meta.seg_slots.tolist() == [0, 2, 1, 0]
    assert meta.tile_starts.tolist() == [0, 8, 24, 27, 29]
    assert meta.tile_lens.tolist() == [5, 16, 3, 2, 4]
    assert meta.tile_slots.tolist() == [0, 2, 2, 1, 0]
    assert meta.lora_rows.tolist() == [0, 1, 2, 3, 4, 29, 30, 31, 32, 27, 28, *range(8, 27)]
    assert meta.slot_ranges == ((0, 0, 9), (1, 9, 11), (2, 11, 30))
    assert meta.slot_ends.tolist() == [9, 11, 30, 30]
    assert not meta.prefers_bgmv


def test_metadata_for_decode_prefers_per_row_kernels() -> None:
    meta = LoRAStepMetadata.build(SLOT_PATTERNS["decode"], NUM_SLOTS)
    assert meta.prefers_bgmv
    assert meta.slot_ranges == ((0, 0, 2), (1, 2, 4), (2, 4, 5), (3, 5, 7))


def test_metadata_keeps_a_slice_when_lora_rows_are_one_range() -> None:
    meta = LoRAStepMetadata.build(SLOT_PATTERNS["one_adapter"], NUM_SLOTS)
    assert meta.lora_rows == slice(2, 9)


def test_metadata_lays_a_mixed_decode_batch_out_as_a_padded_slot_grid() -> None:
    meta = LoRAStepMetadata.build(SLOT_PATTERNS["decode"], NUM_SLOTS)
    grid = meta.grid
    assert grid is not None and grid.rows_per_slot == 2
    # Slot 0 holds tokens 1 and 8, slot 1 tokens 4 and 5, slot 2 token 6 (one padding cell), slot 3 tokens 0 and 3.
    assert grid.cell_tokens.tolist() == [1, 8, 4, 5, 6, 0, 0, 3]
    assert grid.padding is not None and grid.padding.flatten().tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
    # Each token reads its delta from its cell; the base tokens 2 and 7 from the padding cell.
    assert grid.token_cells.tolist() == [6, 0, 5, 7, 2, 3, 4, 5, 1]


def test_metadata_skips_the_grid_when_it_would_be_mostly_padding() -> None:
    one_long_prompt = [0] * 40 + [1, 2, 3]
    assert LoRAStepMetadata.build(one_long_prompt, NUM_SLOTS).grid is None
    assert LoRAStepMetadata.build([-1, 2, 2, 1, 0, 3, 3], NUM_SLOTS).grid.padding is not None
    assert LoRAStepMetadata.build([0, 1, 2, 3], NUM_SLOTS).grid.padding is None
    with_base_token = LoRAStepMetadata.build([0, 1, 2, 3, -1], NUM_SLOTS).grid
    assert with_base_token.rows_per_slot == 2 and with_base_token.token_cells[4] in (1, 3, 5, 7)


def test_metadata_of_empty_and_base_only_steps() -> None:
    for slots in ([], [-1, -1, -1]):
        meta = LoRAStepMetadata.build(slots, NUM_SLOTS)
        assert not meta.has_lora and meta.num_tiles == 0 and meta.slot_ranges == ()


@pytest.mark.parametrize("bad_slot", [-2, NUM_SLOTS])
def test_metadata_rejects_slots_out_of_range(bad_slot: int) -> None:
    with pytest.raises(ValueError, match="token slots"):
        LoRAStepMetadata.build([0, bad_slot], NUM_SLOTS)


# ---------------------------------------------------------------------------- torch path


@pytest.mark.parametrize("pattern", sorted(SLOT_PATTERNS))
@pytest.mark.parametrize("rank", [1, 8, 12, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sizes", [(90, 130), (128, 96)], ids=["odd", "aligned"])
def test_torch_path_matches_per_token_oracle(
    pattern: str, rank: int, dtype: torch.dtype, sizes: tuple[int, int]
) -> None:
    slots = SLOT_PATTERNS[pattern]
    in_features, out_features = sizes
    x, lora_a, lora_b = make_weights(len(slots), in_features, out_features, rank, dtype)
    meta = LoRAStepMetadata.build(slots, NUM_SLOTS)
    expected = oracle_delta(x, lora_a, lora_b, slots)

    buffer = TORCH.shrink(x, lora_a, meta)
    assert buffer.dtype == torch.float32
    assert_close(buffer, oracle_shrink(x, lora_a, slots), dtype)

    base = torch.randn(len(slots), out_features + 7).to(dtype)
    out = base.clone()
    TORCH.expand(buffer, lora_b, meta, out, offset=3)
    assert_close(out[:, 3:-4], base[:, 3:-4].float() + expected, dtype)
    assert torch.equal(out[:, :3], base[:, :3]) and torch.equal(out[:, -4:], base[:, -4:])

    # The C++ kernel (fp32 in its layout, where built), batched matmuls over the grid, grouped matmuls by slot.
    kernel_weights = (in_kernel_layout(lora_a), in_kernel_layout(lora_b))
    for layout, weights, backend in (
        (meta, kernel_weights, KERNEL), (meta, (lora_a, lora_b), TORCH), (dataclasses.replace(meta, grid=None), kernel_weights, TORCH),
    ):
        fused = base.clone()
        backend.add_lora(fused, x, *weights, layout, offset=3)
        assert_close(fused, out, dtype)


def test_packed_layer_slices_land_in_their_own_columns() -> None:
    slots = SLOT_PATTERNS["decode"]
    x, a_q, b_q = make_weights(len(slots), 64, 32, 8, torch.float32, seed=1)
    _, a_v, b_v = make_weights(len(slots), 64, 16, 8, torch.float32, seed=2)
    meta = LoRAStepMetadata.build(slots, NUM_SLOTS)
    q_delta, v_delta = oracle_delta(x, a_q, b_q, slots), oracle_delta(x, a_v, b_v, slots)

    side_by_side = torch.zeros(len(slots), 50)
    TORCH.add_lora(side_by_side, x, [a_q, a_v], [b_q, b_v], meta, offset=2)
    assert_close(side_by_side, torch.cat([torch.zeros(len(slots), 2), q_delta, v_delta], 1), torch.float32)

    apart = torch.zeros(len(slots), 72)
    buffers = TORCH.shrink(x, [a_q, a_v], meta)
    assert isinstance(buffers, list) and len(buffers) == 2
    TORCH.expand(buffers, [b_q, b_v], meta, apart, offset=[40, 0])
    assert_close(apart[:, 40:], q_delta, torch.float32)
    assert_close(apart[:, :16], v_delta, torch.float32)
    assert not apart[:, 16:40].any()


@pytest.mark.skipif(cpu_ops.EXTENSION.module() is None, reason="no C++ compiler for the CPU kernel")
@pytest.mark.parametrize("pattern", ["decode", "prefill", "long"])
def test_cpu_kernel_serves_float32_batches_of_any_length_and_packed_slices(pattern: str) -> None:
    # "long": a slot with more tokens than one work unit (16) and a token count off the tile (4).
    slots = SLOT_PATTERNS.get(pattern) or [2] * 37 + [-1] * 2 + [0] * 5 + [3]
    # Widths off the 16-float register block and ranks below it exercise every tile shape.
    x, a_q, b_q = make_weights(len(slots), 70, 83, 8, torch.float32, seed=1)
    _, a_v, b_v = make_weights(len(slots), 70, 16, 8, torch.float32, seed=2)
    stacked_a = in_kernel_layout(torch.cat([a_q, a_v], dim=1))
    b_slices = [in_kernel_layout(b_q), in_kernel_layout(b_v)]
    meta = LoRAStepMetadata.build(slots, NUM_SLOTS)
    out = torch.zeros(len(slots), 101)
    assert cpu_ops.applies(out, x, stacked_a, b_slices)
    assert not cpu_ops.applies(out, x.half(), stacked_a, b_slices)
    assert not cpu_ops.applies(out, x, torch.cat([a_q, a_v], dim=1), [b_q, b_v])  # row-major weights
    KERNEL.add_lora(out, x, stacked_a, b_slices, meta, offset=2)
    expected = torch.cat([torch.zeros(len(slots), 2), oracle_delta(x, a_q, b_q, slots), oracle_delta(x, a_v, b_v, slots)], 1)
    assert_close(out, expected, torch.float32)

    # The kernel checks what the Python side promises instead of reading or writing out of bounds.
    with pytest.raises(RuntimeError, match="slot_ends has"):
        cpu_ops.add_lora_by_slot(out, x, stacked_a, b_slices, [2, 85], dataclasses.replace(meta, slot_ends=meta.slot_ends[:-1]))
    with pytest.raises(RuntimeError, match="does not fit the slots or the output columns"):
        cpu_ops.add_lora_by_slot(out, x, stacked_a, b_slices, [2, 90], meta)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_ops.add_lora_by_slot(out[:3], x, stacked_a, b_slices, [2, 85], meta)


def test_base_tokens_stay_untouched_even_with_garbage_buffers() -> None:
    slots = [-1, 1, -1, 1, 1]
    x, lora_a, lora_b = make_weights(len(slots), 40, 24, 4, torch.float32)
    for unused in (0, 2, 3):
        lora_a[unused], lora_b[unused] = float("nan"), float("nan")
    meta = LoRAStepMetadata.build(slots, NUM_SLOTS)
    buffer = torch.full((len(slots), 4), float("nan"))
    TORCH.shrink(x, lora_a, meta, out=buffer)
    out = torch.randn(len(slots), 24)
    before = out.clone()
    TORCH.expand(buffer, lora_b, meta, out)
    assert torch.equal(out[[0, 2]], before[[0, 2]])
    assert torch.isfinite(out).all()
    assert_close(
        out, before + oracle_delta(x, lora_a.nan_to_num(), lora_b.nan_to_num(), slots), torch.float32
    )


@pytest.mark.parametrize("slots", [[], [-1, -1, -1]], ids=["empty", "base_only"])
def test_empty_and_base_only_batches_are_noops(slots: list[int]) -> None:
    x, lora_a, lora_b = make_weights(len(slots), 16, 8, 4, torch.float32)
    meta = LoRAStepMetadata.build(slots, NUM_SLOTS)
    out = torch.randn(len(slots), 8)
    before = out.clone()
    TORCH.add_lora(out, x, lora_a, lora_b, meta)
    TORCH.expand(TORCH.shrink(x, lora_a, meta), lora_b, meta, out)
    assert torch.equal(out, before)


def test_mismatched_shapes_are_refused() -> None:
    x, lora_a, lora_b = make_weights(3, 16, 8, 4, torch.float32)
    meta = LoRAStepMetadata.build([0, 1, -1], NUM_SLOTS)
    with pytest.raises(ValueError):
        TORCH.shrink(x[:, :15], lora_a, meta)
    with pytest.raises(ValueError):
        TORCH.add_lora(torch.zeros(3, 7), x, lora_a, lora_b, meta)
    with pytest.raises(ValueError):
        TORCH.shrink(x[:2], lora_a, meta)


def test_report_torch_path_cost_on_cpu() -> None:
    """Not a pass/fail check: prints what LoRA adds to one 256x256 linear on CPU (T=256, rank 16, 8 slots)."""
    tokens, hidden, rank, slots_used = 256, 256, 16, 8
    x, lora_a, lora_b = make_weights(tokens, hidden, hidden, rank, torch.float32)
    lora_a, lora_b = lora_a.repeat(2, 1, 1), lora_b.repeat(2, 1, 1)
    weight = torch.randn(hidden, hidden)
    out = torch.empty(tokens, hidden)
    layouts = {
        "prefill (8 runs)": torch.arange(slots_used).repeat_interleave(tokens // slots_used),
        "decode (shuffled)": torch.randperm(tokens) % slots_used,
    }
    base_us = _best_time_us(lambda: torch.matmul(x, weight.t(), out=out))
    print(f"\nbase matmul [{tokens}x{hidden}]·[{hidden}x{hidden}]: {base_us:.0f} us")
    for name, slots in layouts.items():
        meta = LoRAStepMetadata.build(slots, 2 * NUM_SLOTS)
        lora_us = _best_time_us(lambda meta=meta: TORCH.add_lora(out, x, lora_a, lora_b, meta))
        build_us = _best_time_us(lambda slots=slots: LoRAStepMetadata.build(slots, 2 * NUM_SLOTS))
        print(
            f"{name}: add_lora {lora_us:.0f} us ({lora_us / base_us:.2f}x base), metadata {build_us:.0f} us/step"
        )


def _best_time_us(fn, repeats: int = 5, number: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best * 1e6


# ---------------------------------------------------------------------------- triton path


def run_triton_cases(pattern: str) -> None:
    """Triton against torch for one slot pattern; run in a process started with TRITON_INTERPRET=1."""
    from lora.ops.triton_ops import TritonBackend

    os.environ[BACKEND_ENV] = "triton"
    assert isinstance(select_backend(NUM_SLOTS, "cpu", torch.float32), TritonBackend)
    backends = (TorchBackend(NUM_SLOTS), TritonBackend(NUM_SLOTS))

    def on_both_backends(fn):
        return [fn(backend) for backend in backends]

    slots = SLOT_PATTERNS[pattern]
    meta = LoRAStepMetadata.build(slots, NUM_SLOTS)
    assert meta.prefers_bgmv == (pattern == "decode")
    cases = [(rank, torch.float32) for rank in (1, 8, 12, 16)] + [(12, torch.float16), (16, torch.bfloat16)]
    for rank, dtype in cases:
        x, lora_a, lora_b = make_weights(len(slots), 88, 130, rank, dtype)
        base = torch.randn(len(slots), 140).to(dtype)

        def shrink_then_expand(backend, x=x, lora_a=lora_a, lora_b=lora_b, base=base):
            buffer, out = backend.shrink(x, lora_a, meta), base.clone()
            backend.expand(buffer, lora_b, meta, out, offset=5)
            return buffer, out

        (want_buffer, want_out), (buffer, out) = on_both_backends(shrink_then_expand)
        assert_close(buffer, want_buffer, dtype)
        assert_close(out, want_out, dtype)
        assert torch.equal(out[:, :5], base[:, :5]) and torch.equal(out[:, 135:], base[:, 135:])

    x, a_q, b_q = make_weights(len(slots), 40, 24, 8, torch.float16, seed=1)
    _, a_v, b_v = make_weights(len(slots), 40, 8, 8, torch.float16, seed=2)
    packed = torch.zeros(len(slots), 34, dtype=torch.float16)

    def add_packed(backend):
        out = packed.clone()
        backend.add_lora(out, x, [a_q, a_v], [b_q, b_v], meta, offset=1)
        return out

    want, got = on_both_backends(add_packed)
    assert_close(got, want, torch.float16)
    assert not got[:, 0].any() and not got[:, 33].any()

    stacked_a = torch.cat([a_q, a_v], dim=1)  # how the LoRA layers hold a packed layer's A: the kernels get views

    def add_stacked(backend):
        out = packed.clone()
        backend.add_lora(out, x, stacked_a, [b_q, b_v], meta, offset=1)
        return out

    for result in on_both_backends(add_stacked):
        assert_close(result, want, torch.float16)

    def add_layer(backend):  # a layer's per-step call, on buffers the backend allocated and packed
        stacked, slices = backend.slot_weights(16, 40, torch.float16), [backend.slot_weights(n, 8, torch.float16) for n in (24, 8)]
        stacked.copy_(stacked_a)
        for buffer, b in zip(slices, (b_q, b_v)):
            buffer.copy_(b)
        out = packed.clone()
        backend.add_packed(out, x, backend.pack(stacked, slices, (1, 25)), meta)
        return out

    for result in on_both_backends(add_layer):
        assert_close(result, want, torch.float16)

    for no_lora in ([], [-1, -1]):
        x, lora_a, lora_b = make_weights(len(no_lora), 88, 130, 8, torch.float32)
        out = torch.zeros(len(no_lora), 130)
        backends[1].add_lora(out, x, lora_a, lora_b, LoRAStepMetadata.build(no_lora, NUM_SLOTS))
        assert not out.any()


@pytest.mark.parametrize("pattern", ["prefill", "decode"], ids=["sgmv", "bgmv"])
def test_triton_interpreted_matches_torch(pattern: str) -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    script = f"from tests.lora.test_ops import run_triton_cases; run_triton_cases({pattern!r})"
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pattern", ["prefill", "decode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_on_cuda_matches_torch(
    pattern: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    slots = SLOT_PATTERNS[pattern]
    x, lora_a, lora_b = make_weights(len(slots), 88, 130, 12, dtype)
    base = torch.randn(len(slots), 140).to(dtype)
    results = []
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    for device in ("cpu", "cuda"):
        backend = select_backend(NUM_SLOTS, device, dtype)
        meta = backend.build_metadata(slots)
        out = base.to(device)
        backend.add_lora(out, x.to(device), lora_a.to(device), lora_b.to(device), meta, offset=5)
        results.append(out.cpu())
    assert_close(results[1], results[0], dtype)


# ---------------------------------------------------------------------------- a layer's packed weights


def test_layer_weights_are_checked_once_and_serve_kernel_and_torch_layouts_alike() -> None:
    slots = SLOT_PATTERNS["prefill"]
    x, a_q, b_q = make_weights(len(slots), 40, 24, 4, torch.float32, seed=3)
    _, a_v, b_v = make_weights(len(slots), 40, 8, 4, torch.float32, seed=4)
    meta = LoRAStepMetadata.build(slots, NUM_SLOTS)
    expected = torch.zeros(len(slots), 40)
    expected[:, 1:25], expected[:, 30:38] = oracle_delta(x, a_q, b_q, slots), oracle_delta(x, a_v, b_v, slots)
    row_major = TORCH.pack(torch.cat([a_q, a_v], 1), (b_q, b_v), (1, 30))
    kernel = KERNEL.pack(in_kernel_layout(torch.cat([a_q, a_v], 1)), (in_kernel_layout(b_q), in_kernel_layout(b_v)), (1, 30))
    assert not isinstance(row_major, KernelLoRAWeights)
    assert isinstance(kernel, KernelLoRAWeights) == (cpu_ops.EXTENSION.module() is not None)
    assert not isinstance(KERNEL.pack(torch.cat([a_q, a_v], 1), (b_q, b_v), (1, 30)), KernelLoRAWeights)  # row-major
    for backend, weights in ((TORCH, row_major), (KERNEL, kernel), (KERNEL, row_major)):
        out = torch.zeros(len(slots), 40)
        backend.add_packed(out, x, weights, meta)
        assert_close(out, expected, torch.float32)

    with pytest.raises(ValueError, match="does not fit 4 slots of rank 4"):
        TORCH.pack(torch.cat([a_q, a_v], 1), (b_q, b_v[:, :, :3]), (1, 30))
    with pytest.raises(ValueError, match="do not match"):
        TORCH.pack(torch.cat([a_q, a_v], 1), (b_q, b_v), (1,))
    for backend, weights in ((TORCH, row_major), (KERNEL, kernel)):
        with pytest.raises(ValueError, match=r"x \(33, 39\) is not \[33, 40\]"):
            backend.add_packed(torch.zeros(len(slots), 40), x[:, :39], weights, meta)
        with pytest.raises(ValueError, match="cannot take 38 columns"):
            backend.add_packed(torch.zeros(len(slots), 37), x, weights, meta)


# ---------------------------------------------------------------------------- which backend a worker runs


def test_backend_is_chosen_once_from_device_dtype_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel_built = cpu_ops.EXTENSION.module() is not None
    for choice in ("", "auto", "torch", "TORCH"):
        monkeypatch.setenv(BACKEND_ENV, choice)
        backend = select_backend(NUM_SLOTS, "cpu", torch.float32)
        assert type(backend) is (CpuKernelBackend if kernel_built else TorchBackend)
        assert (backend.num_slots, backend.device) == (NUM_SLOTS, torch.device("cpu"))
        assert type(select_backend(NUM_SLOTS, "cpu", torch.bfloat16)) is TorchBackend  # the kernel is float32 only
    monkeypatch.setenv(BACKEND_ENV, "cuda-graphs")
    with pytest.raises(ValueError, match="must be torch, triton or auto"):
        select_backend(NUM_SLOTS, "cpu", torch.float32)


def test_each_backend_lays_slot_buffers_out_its_own_way() -> None:
    stored_transposed = KERNEL.slot_weights(8, 16, torch.float32)
    row_major = TORCH.slot_weights(8, 16, torch.float32)
    assert stored_transposed.shape == row_major.shape == (NUM_SLOTS, 8, 16)
    assert stored_transposed.transpose(1, 2).is_contiguous() and row_major.is_contiguous()
    assert not stored_transposed.any() and not row_major.any()


def test_the_backend_indexes_each_step_for_tokens_and_sampled_rows() -> None:
    backend = TorchBackend(NUM_SLOTS)
    backend.set_step(np.array([2, -1, 0]), np.array([3, 1, 2]))  # prefill: tokens and sampled rows differ
    assert backend.token_meta is not None and backend.token_meta.token_slots.tolist() == [2, 2, 2, -1, 0, 0]
    assert backend.row_meta is not None and backend.row_meta.token_slots.tolist() == [2, -1, 0]
    backend.set_step(np.array([1, 3]), np.array([1, 1]))  # decode: one token per row, one index serves both
    assert backend.row_meta is backend.token_meta
    backend.set_step(None, np.array([4]))
    assert backend.token_meta is None and backend.row_meta is None

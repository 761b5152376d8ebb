"""The Triton backend: SGMV (segment tiles, tensor-core dots) and BGMV (one row per program) kernels.

SGMV suits prefill, where a sequence's tokens form long runs sharing one adapter:
a program takes a tile of up to 16 consecutive tokens of one slot, so the adapter
weights it loads serve the whole tile. BGMV suits decode, where each row may use a
different slot and a 16-row tile would be mostly padding. All accumulation is fp32;
masks make any feature size and rank work; slot buffers are row-major. Whether the kernels
are interpreted (`TRITON_INTERPRET=1`, CPU tensors) is fixed when this module is imported, so
the worker imports it only once it has chosen this backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora.ops.backend import LoRABackend
from lora.ops.metadata import SGMV_TILE_TOKENS, LoRAStepMetadata

# Read at import, the moment `triton.jit` below decides the same thing.
_INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, buf_ptr, tile_starts_ptr, tile_lens_ptr, tile_slots_ptr,
    in_features, rank,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_bt, stride_br,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    start = tl.load(tile_starts_ptr + tile)
    length = tl.load(tile_lens_ptr + tile)
    slot = tl.load(tile_slots_ptr + tile).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (start + offs_t).to(tl.int64)
    t_mask = offs_t < length
    r_mask = offs_r < rank

    x_ptrs = x_ptr + rows[:, None] * stride_xt + offs_k[None, :] * stride_xk
    a_ptrs = a_ptr + slot * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k_mask = (k0 + offs_k) < in_features
        x = tl.load(x_ptrs, mask=t_mask[:, None] & k_mask[None, :], other=0.0).to(DOT_DTYPE)
        a = tl.load(a_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(DOT_DTYPE)
        acc += tl.dot(x, tl.trans(a), input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak

    buf_ptrs = buf_ptr + rows[:, None] * stride_bt + offs_r[None, :] * stride_br
    tl.store(buf_ptrs, acc, mask=t_mask[:, None] & r_mask[None, :])


@triton.jit
def _sgmv_expand_kernel(
    buf_ptr, b_ptr, out_ptr, tile_starts_ptr, tile_lens_ptr, tile_slots_ptr,
    rank, out_features, col_offset,
    stride_bt, stride_br, stride_bs, stride_bn, stride_bk, stride_ot, stride_on,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    start = tl.load(tile_starts_ptr + tile)
    length = tl.load(tile_lens_ptr + tile)
    slot = tl.load(tile_slots_ptr + tile).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    rows = (start + offs_t).to(tl.int64)
    t_mask = offs_t < length
    n_mask = offs_n < out_features

    buf_ptrs = buf_ptr + rows[:, None] * stride_bt + offs_r[None, :] * stride_br
    b_ptrs = b_ptr + slot * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_bk
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r_mask = (r0 + offs_r) < rank
        h = tl.load(buf_ptrs, mask=t_mask[:, None] & r_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        acc += tl.dot(h.to(DOT_DTYPE), tl.trans(b.to(DOT_DTYPE)), input_precision=PRECISION)
        buf_ptrs += BLOCK_R * stride_br
        b_ptrs += BLOCK_R * stride_bk

    out_ptrs = out_ptr + rows[:, None] * stride_ot + (col_offset + offs_n)[None, :] * stride_on
    out_mask = t_mask[:, None] & n_mask[None, :]
    current = tl.load(out_ptrs, mask=out_mask, other=0.0)
    tl.store(out_ptrs, (current.to(tl.float32) + acc).to(current.dtype), mask=out_mask)


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, buf_ptr, token_slots_ptr,
    in_features, rank,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_bt, stride_br,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(token_slots_ptr + row)
    if slot >= 0:
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        r_mask = offs_r < rank
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            k_mask = (k0 + offs_k) < in_features
            x = tl.load(x_ptr + row * stride_xt + (k0 + offs_k) * stride_xk, mask=k_mask, other=0.0)
            a_ptrs = (
                a_ptr + slot * stride_as + offs_r[:, None] * stride_ar + (k0 + offs_k)[None, :] * stride_ak
            )
            a = tl.load(a_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        tl.store(buf_ptr + row * stride_bt + offs_r * stride_br, acc, mask=r_mask)


@triton.jit
def _bgmv_expand_kernel(
    buf_ptr, b_ptr, out_ptr, token_slots_ptr,
    rank, out_features, col_offset,
    stride_bt, stride_br, stride_bs, stride_bn, stride_bk, stride_ot, stride_on,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(token_slots_ptr + row)
    if slot >= 0:
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        n_mask = offs_n < out_features
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            r_mask = (r0 + offs_r) < rank
            h = tl.load(buf_ptr + row * stride_bt + (r0 + offs_r) * stride_br, mask=r_mask, other=0.0)
            b_ptrs = (
                b_ptr + slot * stride_bs + offs_n[:, None] * stride_bn + (r0 + offs_r)[None, :] * stride_bk
            )
            b = tl.load(b_ptrs, mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            acc += tl.sum(b.to(tl.float32) * h.to(tl.float32)[None, :], axis=1)
        out_ptrs = out_ptr + row * stride_ot + (col_offset + offs_n) * stride_on
        current = tl.load(out_ptrs, mask=n_mask, other=0.0)
        tl.store(out_ptrs, (current.to(tl.float32) + acc).to(current.dtype), mask=n_mask)


def _rank_block(rank: int) -> int:
    """Cover small ranks in one block; `tl.dot` needs at least 16."""
    return min(64, max(16, triton.next_power_of_2(rank)))


def _dot_dtype(operand: torch.Tensor) -> tl.dtype:
    """The SGMV dot runs in the operand's dtype; the interpreter cannot multiply bf16, so it gets fp32."""
    if operand.dtype == torch.float16:
        return tl.float16
    if operand.dtype == torch.bfloat16 and not _INTERPRETED:
        return tl.bfloat16
    return tl.float32


def _dot_precision(dot_dtype: tl.dtype) -> str:
    # fp32 stays fp32 (tf32 would break parity with the reference); 16-bit operands ignore the setting.
    return "ieee" if dot_dtype == tl.float32 else "tf32"


def shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAStepMetadata, buffer: torch.Tensor) -> None:
    """buffer[t] = x[t] @ lora_a[slot[t]].T for LoRA tokens (x [T, in], lora_a [S, R, in], buffer [T, R])."""
    in_features, rank = x.shape[1], lora_a.shape[1]
    strides = (*x.stride(), *lora_a.stride(), *buffer.stride())
    if meta.prefers_bgmv:
        block_r = min(64, triton.next_power_of_2(rank))
        grid = (meta.num_tokens, triton.cdiv(rank, block_r))
        _bgmv_shrink_kernel[grid](
            x, lora_a, buffer, meta.token_slots, in_features, rank, *strides, BLOCK_R=block_r, BLOCK_K=64
        )
        return
    block_r = _rank_block(rank)
    dot_dtype = _dot_dtype(x)
    grid = (meta.num_tiles, triton.cdiv(rank, block_r))
    _sgmv_shrink_kernel[grid](
        x, lora_a, buffer, meta.tile_starts, meta.tile_lens, meta.tile_slots, in_features, rank, *strides,
        BLOCK_T=SGMV_TILE_TOKENS, BLOCK_R=block_r, BLOCK_K=32, DOT_DTYPE=dot_dtype,
        PRECISION=_dot_precision(dot_dtype),
    )  # fmt: skip


def expand(
    buffer: torch.Tensor, lora_b: torch.Tensor, meta: LoRAStepMetadata, out: torch.Tensor, offset: int
) -> None:
    """out[t, offset:offset+N] += buffer[t] @ lora_b[slot[t]].T (buffer [T, R], lora_b [S, N, R])."""
    out_features, rank = lora_b.shape[1], lora_b.shape[2]
    strides = (*buffer.stride(), *lora_b.stride(), *out.stride())
    if meta.prefers_bgmv:
        block_r = min(64, triton.next_power_of_2(rank))
        grid = (meta.num_tokens, triton.cdiv(out_features, 64))
        _bgmv_expand_kernel[grid](
            buffer, lora_b, out, meta.token_slots, rank, out_features, offset, *strides,
            BLOCK_N=64, BLOCK_R=block_r,
        )  # fmt: skip
        return
    dot_dtype = _dot_dtype(lora_b)
    grid = (meta.num_tiles, triton.cdiv(out_features, 64))
    _sgmv_expand_kernel[grid](
        buffer, lora_b, out, meta.tile_starts, meta.tile_lens, meta.tile_slots, rank, out_features, offset,
        *strides, BLOCK_T=SGMV_TILE_TOKENS, BLOCK_N=64, BLOCK_R=_rank_block(rank), DOT_DTYPE=dot_dtype,
        PRECISION=_dot_precision(dot_dtype),
    )  # fmt: skip


class TritonBackend(LoRABackend):
    """Row-major slot buffers (`LoRABackend.slot_weights`); a packed layer shrinks each slice
    into a float32 buffer and expands it, each a kernel launch per slice."""

    _shrink = staticmethod(shrink)
    _expand = staticmethod(expand)

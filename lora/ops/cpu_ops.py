"""The CPU kernel backend: a small C++ kernel for a layer's fused delta in any mixed batch,
decode or prefill, and the torch backend for everything else.

The kernel splits each slot's tokens into units of up to 16 and runs the units in parallel.
For each unit it computes the shrink into a rank-sized scratch (x·Aᵀ), then the expand of each
slice (·Bᵀ), adding straight into those tokens' output rows; a token belongs to one unit, so
no two threads write one row. Both products are register-tiled outer-product updates along
contiguous rows, which needs each slot's A stored input-major and B rank-major: this backend
allocates the layer buffers that way (`CpuKernelBackend.slot_weights`), and they still read
as [slots, rows, cols] views everywhere else. Float32 only (the products are float32 on every
path); built by `workers.cpu_extension`. The worker picks this backend only where the kernel
is built and the LoRA weights are float32; activations it does not serve go to the torch path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lora.ops.backend import PackedLoRAWeights
from lora.ops.metadata import LoRAStepMetadata
from lora.ops.torch_ops import TorchBackend
from workers.cpu_extension import CpuExtension

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kTileTokens = 4;   // token rows one register tile covers
constexpr int64_t kLaneBlock = 16;   // floats in one vector register (AVX-512)
constexpr int64_t kMaxBlocks = 4;    // vector registers per token row in one tile
constexpr int64_t kUnitTokens = 16;  // tokens per work unit: its shrunk rows stay in L1

// c[t][0:W] += sum_k l[t][k] * r[k * r_stride + 0:W] for T token rows, W = BLOCKS * 16 columns,
// with the T x W accumulator held in registers across the whole depth.
template <int T, int BLOCKS>
inline void tile(float* const* c, const float* const* l, const float* r, int64_t r_stride, int64_t depth) {
  constexpr int W = BLOCKS * kLaneBlock;
  float acc[T][W];
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < W; ++j) acc[t][j] = c[t][j];
  for (int64_t k = 0; k < depth; ++k) {
    const float* row = r + k * r_stride;
    for (int t = 0; t < T; ++t) {
      const float lv = l[t][k];
      for (int j = 0; j < W; ++j) acc[t][j] += lv * row[j];
    }
  }
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < W; ++j) c[t][j] = acc[t][j];
}

// The same product for a ragged corner: any T <= kTileTokens and W < 16.
inline void tile_tail(float* const* c, const float* const* l, const float* r, int64_t r_stride, int64_t depth,
                      int64_t tokens, int64_t width) {
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t k = 0; k < depth; ++k) {
      const float lv = l[t][k];
      const float* row = r + k * r_stride;
      for (int64_t j = 0; j < width; ++j) c[t][j] += lv * row[j];
    }
}

template <int T>
inline void tile_blocks(float* const* c, const float* const* l, const float* r, int64_t r_stride, int64_t depth,
                        int64_t blocks) {
  switch (blocks) {
    case 1: tile<T, 1>(c, l, r, r_stride, depth); break;
    case 2: tile<T, 2>(c, l, r, r_stride, depth); break;
    case 3: tile<T, 3>(c, l, r, r_stride, depth); break;
    default: tile<T, 4>(c, l, r, r_stride, depth); break;
  }
}

// C[t][0:width] += L[t][0:depth] . R[0:depth][0:width] for `tokens` rows, where row t of C and
// L start at c_rows[t] and l_rows[t] (both contiguous) and R is row-major with stride r_stride.
void accumulate(const std::vector<float*>& c_rows, const std::vector<const float*>& l_rows, const float* r,
                int64_t r_stride, int64_t depth, int64_t width) {
  const int64_t tokens = static_cast<int64_t>(c_rows.size());
  float* c[kTileTokens];
  const float* l[kTileTokens];
  for (int64_t t0 = 0; t0 < tokens; t0 += kTileTokens) {
    const int64_t rows = std::min(kTileTokens, tokens - t0);
    for (int64_t j0 = 0; j0 < width;) {
      const int64_t blocks = std::min(kMaxBlocks, (width - j0) / kLaneBlock);
      for (int64_t t = 0; t < rows; ++t) {
        c[t] = c_rows[t0 + t] + j0;
        l[t] = l_rows[t0 + t];
      }
      if (blocks == 0) {
        tile_tail(c, l, r + j0, r_stride, depth, rows, width - j0);
        break;
      }
      switch (rows) {
        case 1: tile_blocks<1>(c, l, r + j0, r_stride, depth, blocks); break;
        case 2: tile_blocks<2>(c, l, r + j0, r_stride, depth, blocks); break;
        case 3: tile_blocks<3>(c, l, r + j0, r_stride, depth, blocks); break;
        default: tile_blocks<4>(c, l, r + j0, r_stride, depth, blocks); break;
      }
      j0 += blocks * kLaneBlock;
    }
  }
}

struct Unit {
  int64_t slot, first, count;  // `count` tokens from position `first` of the slot-ordered rows
};

}  // namespace

// out[t, offset_i : offset_i + rows_i] += (x[t] . A[slot]) slice i . B_i[slot] for every LoRA token t.
// a_by_input [slots, in, P*rank] is the stacked A stored input-major; b_by_rank[i] [slots, rank, rows_i]
// is B_i stored rank-major: both products then run along contiguous rows.
void add_lora_by_slot(
    torch::Tensor out, torch::Tensor x, torch::Tensor a_by_input, std::vector<torch::Tensor> b_by_rank,
    std::vector<int64_t> offsets, torch::Tensor rows_by_slot, torch::Tensor slot_ends) {
  const int64_t num_slots = a_by_input.size(0), in_features = a_by_input.size(1), total_rank = a_by_input.size(2);
  TORCH_CHECK(slot_ends.numel() == num_slots, "slot_ends has ", slot_ends.numel(), " entries for ", num_slots, " slots");
  TORCH_CHECK(x.size(1) == in_features, "x has ", x.size(1), " features, A ", in_features);
  TORCH_CHECK(b_by_rank.size() == offsets.size(), b_by_rank.size(), " B slices for ", offsets.size(), " offsets");
  int64_t slice_ranks = 0;
  for (size_t i = 0; i < b_by_rank.size(); ++i) {
    TORCH_CHECK(b_by_rank[i].size(0) == num_slots && offsets[i] >= 0 && offsets[i] + b_by_rank[i].size(2) <= out.size(1),
                "B slice ", i, " does not fit the slots or the output columns");
    slice_ranks += b_by_rank[i].size(1);
  }
  TORCH_CHECK(slice_ranks == total_rank, "the B slices' ranks add up to ", slice_ranks, ", A stacks ", total_rank);
  const int64_t x_stride = x.stride(0), out_stride = out.stride(0);
  const float* x_data = x.data_ptr<float>();
  const float* a_data = a_by_input.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const int64_t* tokens = rows_by_slot.data_ptr<int64_t>();
  const int32_t* ends = slot_ends.data_ptr<int32_t>();
  TORCH_CHECK(rows_by_slot.numel() == (num_slots ? ends[num_slots - 1] : 0), "rows_by_slot does not hold every slot's rows");
  for (int64_t i = 0; i < rows_by_slot.numel(); ++i)
    TORCH_CHECK(tokens[i] >= 0 && tokens[i] < x.size(0) && tokens[i] < out.size(0), "token ", tokens[i], " is out of range");
  std::vector<const float*> b_data;
  std::vector<int64_t> b_rank, b_rows;
  for (const auto& b : b_by_rank) {
    b_data.push_back(b.data_ptr<float>());
    b_rank.push_back(b.size(1));
    b_rows.push_back(b.size(2));
  }
  std::vector<Unit> units;
  for (int64_t slot = 0; slot < num_slots; ++slot) {
    const int64_t first = slot == 0 ? 0 : ends[slot - 1];
    for (int64_t start = first; start < ends[slot]; start += kUnitTokens)
      units.push_back({slot, start, std::min(kUnitTokens, ends[slot] - start)});
  }
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> shrunk;
    std::vector<float*> h_rows, out_rows;
    std::vector<const float*> x_rows, h_in;
    for (int64_t u = begin; u < end; ++u) {
      const Unit& unit = units[u];
      shrunk.assign(unit.count * total_rank, 0.0f);
      h_rows.resize(unit.count);
      x_rows.resize(unit.count);
      out_rows.resize(unit.count);
      h_in.resize(unit.count);
      for (int64_t t = 0; t < unit.count; ++t) {
        const int64_t token = tokens[unit.first + t];
        h_rows[t] = shrunk.data() + t * total_rank;
        x_rows[t] = x_data + token * x_stride;
      }
      accumulate(h_rows, x_rows, a_data + unit.slot * in_features * total_rank, total_rank, in_features, total_rank);
      int64_t rank_offset = 0;
      for (size_t i = 0; i < b_data.size(); ++i) {
        for (int64_t t = 0; t < unit.count; ++t) {
          out_rows[t] = out_data + tokens[unit.first + t] * out_stride + offsets[i];
          h_in[t] = h_rows[t] + rank_offset;
        }
        accumulate(out_rows, h_in, b_data[i] + unit.slot * b_rank[i] * b_rows[i], b_rows[i], b_rank[i], b_rows[i]);
        rank_offset += b_rank[i];
      }
    }
  });
}
"""

EXTENSION = CpuExtension("raylora_lora_by_slot", _SOURCE, ["add_lora_by_slot"])


def _stored_transposed(weights: torch.Tensor) -> bool:
    return weights.transpose(1, 2).is_contiguous()


def weights_fit(stacked_a: torch.Tensor, lora_b: Sequence[torch.Tensor]) -> bool:
    """Float32 CPU weights in the kernel's layout (`CpuKernelBackend.slot_weights`), and the kernel built."""
    return all(
        w.device.type == "cpu" and w.dtype == torch.float32 and _stored_transposed(w) for w in (stacked_a, *lora_b)
    ) and EXTENSION.module() is not None


def inputs_fit(out: torch.Tensor, x: torch.Tensor) -> bool:
    """Float32 CPU activations whose rows are contiguous."""
    return (
        out.dtype == torch.float32 and x.dtype == torch.float32 and out.is_cpu and x.is_cpu
        and out.stride(1) == 1 and x.stride(1) == 1
    )


def applies(out: torch.Tensor, x: torch.Tensor, stacked_a: torch.Tensor, lora_b: Sequence[torch.Tensor]) -> bool:
    """The kernel serves these activations and weights."""
    return inputs_fit(out, x) and weights_fit(stacked_a, lora_b)


@dataclass(frozen=True)
class KernelViews:
    """The kernel's operands: A [slots, in, P*rank] and each B [slots, rank, out_i], contiguous."""

    a_by_input: torch.Tensor
    b_by_rank: list[torch.Tensor]

    @classmethod
    def of(cls, stacked_a: torch.Tensor, lora_b: Sequence[torch.Tensor]) -> KernelViews:
        """Views of weights that `weights_fit`."""
        return cls(stacked_a.transpose(1, 2), [b.transpose(1, 2) for b in lora_b])


def run(out: torch.Tensor, x: torch.Tensor, views: KernelViews, offsets: Sequence[int], meta: LoRAStepMetadata) -> None:
    """out[t, offset_i:...] += x[t] @ A[slot]ᵀ (slice i) @ B_i[slot]ᵀ for every LoRA token, in place."""
    module = EXTENSION.module()
    assert module is not None
    module.add_lora_by_slot(out, x, views.a_by_input, views.b_by_rank, offsets, meta.rows_by_slot, meta.slot_ends)


def add_lora_by_slot(
    out: torch.Tensor,
    x: torch.Tensor,
    stacked_a: torch.Tensor,
    lora_b: Sequence[torch.Tensor],
    offsets: Sequence[int],
    meta: LoRAStepMetadata,
) -> None:
    """`run` on weights given as [slots, rows, cols] views in the kernel's layout."""
    run(out, x, KernelViews.of(stacked_a, lora_b), offsets, meta)


@dataclass(frozen=True)
class KernelLoRAWeights(PackedLoRAWeights):
    """A layer's buffers in the kernel's layout, with the kernel's views of them made once."""

    views: KernelViews = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "views", KernelViews.of(self.stacked_a, self.lora_b))


class CpuKernelBackend(TorchBackend):
    """Slot buffers stored transposed, as the kernel reads them; a layer's fused delta in the
    kernel, and the torch path for the rest (shrink or expand alone, other activations)."""

    def slot_weights(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """Each slot stored transposed: a [num_slots, cols, rows] buffer seen through a transposed view."""
        return torch.zeros(self.num_slots, cols, rows, dtype=dtype, device=self.device).transpose(1, 2)

    def pack(self, stacked_a: torch.Tensor, lora_b: Sequence[torch.Tensor], offsets: Sequence[int]) -> PackedLoRAWeights:
        if weights_fit(stacked_a, lora_b):
            return KernelLoRAWeights(stacked_a, tuple(lora_b), tuple(offsets))
        return super().pack(stacked_a, lora_b, offsets)

    def add_packed(self, out: torch.Tensor, x: torch.Tensor, weights: PackedLoRAWeights, meta: LoRAStepMetadata) -> None:
        weights.check_step(out, x, meta)
        if not meta.has_lora:
            return
        if isinstance(weights, KernelLoRAWeights) and inputs_fit(out, x):
            run(out, x, weights.views, weights.offsets, meta)
            return
        super()._add_stacked(out, x, weights.stacked_a, list(weights.lora_b), meta, list(weights.offsets))

    def _add_stacked(
        self, out: torch.Tensor, x: torch.Tensor, stacked_a: torch.Tensor, lora_b: list[torch.Tensor],
        meta: LoRAStepMetadata, offsets: list[int],
    ) -> None:
        if applies(out, x, stacked_a, lora_b):
            add_lora_by_slot(out, x, stacked_a, lora_b, offsets, meta)
            return
        super()._add_stacked(out, x, stacked_a, lora_b, meta, offsets)

"""Paged decode attention for CPU workers: a small C++ kernel compiled on first use.

The torch path gathers every sequence's cache blocks into a padded batch before attending,
so a decode step copies the whole KV history of the batch (padded to its longest sequence)
and reads it twice. This kernel reads each sequence's keys and values in place, block by
block through the block table, with an online softmax: one pass over exactly the cached
tokens, nothing copied. It is parallel over (sequence, kv head) with torch's own thread pool.

It is built by `workers.cpu_extension` (once per machine, cached on disk). Where it cannot be,
or `RAYLORA_CPU_KERNELS=0`, the torch path serves instead; results agree to float rounding.
"""

from __future__ import annotations

from types import ModuleType

import torch

from workers.cpu_extension import CpuExtension

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

// exp(x) for x <= 0 (a softmax's shifted scores): 2^n * p(r) with a degree-6 polynomial on
// r in [-ln2/2, ln2/2], about 2 ulp; plain arithmetic, so the compiler vectorizes the loops it sits in.
static inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return p * two_n;
}

template <typename scalar_t>
static void decode_attention(
    const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache,
    const int64_t* block_tables, const int64_t* context_lens, scalar_t* out,
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, int64_t blocks_per_seq, double scale) {
  // One sequence per task: a cached token's keys for all kv heads are one contiguous row.
  const int64_t group = num_heads / num_kv_heads;
  const int64_t token_stride = num_kv_heads * head_dim;
  at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(num_heads * head_dim), acc(num_heads * head_dim);
    std::vector<float> running_max(num_heads), denom(num_heads), scores(num_heads * block_size);
    for (int64_t seq = begin; seq < end; ++seq) {
      const int64_t length = context_lens[seq];
      const scalar_t* q_row = q + seq * num_heads * head_dim;
      for (int64_t i = 0; i < num_heads * head_dim; ++i) query[i] = static_cast<float>(q_row[i]) * scale;
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(running_max.begin(), running_max.end(), -std::numeric_limits<float>::infinity());
      std::fill(denom.begin(), denom.end(), 0.0f);
      for (int64_t first = 0; first < length; first += block_size) {
        const int64_t block = block_tables[seq * blocks_per_seq + first / block_size];
        const int64_t count = std::min(block_size, length - first);
        const scalar_t* keys = k_cache + block * block_size * token_stride;
        const scalar_t* values = v_cache + block * block_size * token_stride;
        for (int64_t t = 0; t < count; ++t) {
          for (int64_t h = 0; h < num_heads; ++h) {
            const scalar_t* key = keys + t * token_stride + (h / group) * head_dim;
            const float* qh = query.data() + h * head_dim;
            float dot = 0.0f;
            for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * static_cast<float>(key[d]);
            scores[h * block_size + t] = dot;
          }
        }
        for (int64_t h = 0; h < num_heads; ++h) {
          float* probs = scores.data() + h * block_size;
          float block_max = probs[0];
          for (int64_t t = 1; t < count; ++t) block_max = std::max(block_max, probs[t]);
          const float new_max = std::max(running_max[h], block_max);
          const float correction = exp_nonpositive(running_max[h] - new_max);
          float block_sum = 0.0f;
          for (int64_t t = 0; t < count; ++t) {
            probs[t] = exp_nonpositive(probs[t] - new_max);
            block_sum += probs[t];
          }
          denom[h] = denom[h] * correction + block_sum;
          running_max[h] = new_max;
          float* ah = acc.data() + h * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) ah[d] *= correction;
        }
        for (int64_t t = 0; t < count; ++t) {
          for (int64_t h = 0; h < num_heads; ++h) {
            const float p = scores[h * block_size + t];
            const scalar_t* value = values + t * token_stride + (h / group) * head_dim;
            float* ah = acc.data() + h * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) ah[d] += p * static_cast<float>(value[d]);
          }
        }
      }
      scalar_t* out_row = out + seq * num_heads * head_dim;
      for (int64_t h = 0; h < num_heads; ++h) {
        const float inv = denom[h] > 0.0f ? 1.0f / denom[h] : 0.0f;
        for (int64_t d = 0; d < head_dim; ++d) out_row[h * head_dim + d] = static_cast<scalar_t>(acc[h * head_dim + d] * inv);
      }
    }
  });
}

torch::Tensor paged_decode_attention(
    torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
    torch::Tensor block_tables, torch::Tensor context_lens, int64_t block_size, double scale) {
  auto out = torch::empty_like(q);
  const int64_t num_kv_heads = k_cache.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    decode_attention<scalar_t>(
        q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
        block_tables.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
        q.size(0), q.size(1), num_kv_heads, q.size(2), block_size, block_tables.size(1), scale);
  });
  return out;
}
"""

EXTENSION = CpuExtension("raylora_paged_attention", _SOURCE, ["paged_decode_attention"])


def kernel() -> ModuleType | None:
    """The compiled extension, building it on first use; None where it cannot be built."""
    return EXTENSION.module()


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """q [B, H, D]; caches [num_blocks * block_size, Hkv, D]; block_tables [B, M] int64 (at least
    ceil(context_len / block_size) valid entries per row); context_lens [B] int64 -> [B, H, D]."""
    module = kernel()
    if module is None:
        raise RuntimeError("the CPU paged-attention kernel is not available on this machine")
    return module.paged_decode_attention(
        q.contiguous(), k_cache, v_cache, block_tables.contiguous(), context_lens.contiguous(), block_size, scale
    )

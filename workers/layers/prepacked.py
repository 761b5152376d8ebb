"""oneDNN-prepacked weights for the linear layers of CPU workers.

A plain `F.linear` on CPU hands the dense weight to the BLAS, which repacks panels of it on
every call; at decode batch sizes that repacking and the generic kernel cost 1.3-2.5x the
time of oneDNN's brgemm on a weight reordered once, up front, into its blocked layout. So after
loading, each linear layer's weight is replaced by its reordered copy (the dense one is
dropped, so memory does not double) and `linear` dispatches on the weight's layout. A tied LM
head gets its own packed copy: the embedding keeps the dense rows it looks tokens up in.

oneDNN builds, JIT-compiles and caches a kernel for every input row count it meets (ideep's and
oneDNN's caches, 1,024 entries each), and a server meets nearly every token count up to its
budget: in rounds of 1,024 requests arriving while others run (scripts/engine_memory.py), the
engine's RSS grew 437 -> 892 MiB over eight rounds, each new count paying a compile. So the rows
are padded up to one of eight sizes per power of two (`padded_rows`): 72 sizes up to 2,048
tokens, under 1/8 more rows (decode steps at small batch sizes are weight-bound: their extra rows
are nearly free). With that the same rounds grew it 437 -> 576 MiB, and ran as fast or faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.cpu_extension import cpu_kernels_enabled

# The reorder picks its blocking for a batch of about this many rows; any batch size works.
BATCH_SIZE_HINT = 64


# Row counts up to this run as they are; above, each power of two is cut into this many sizes.
EXACT_ROWS = 16
SIZES_PER_OCTAVE = 8


def padded_rows(rows: int) -> int:
    """The row count oneDNN sees for `rows` rows: `rows` itself up to EXACT_ROWS, then the next of
    SIZES_PER_OCTAVE evenly spaced sizes in its power of two."""
    if rows <= EXACT_ROWS:
        return rows
    octave_width = 1 << ((rows - 1).bit_length() - 1)  # rows lies in (octave_width, 2 * octave_width]
    step = max(1, octave_width // SIZES_PER_OCTAVE)
    return -(-rows // step) * step


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ + b for a dense or a prepacked W (x's rows padded to a cached size for oneDNN)."""
    if not weight.is_mkldnn:
        return F.linear(x, weight, bias)
    rows = x.shape[0]
    padding = padded_rows(rows) - rows if x.dim() == 2 else 0
    if padding:
        x = F.pad(x, (0, 0, 0, padding))
    output = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return output[:rows] if padding else output


def can_prepack(weight: torch.Tensor) -> bool:
    """oneDNN serves this weight's device and dtype on this build and machine."""
    if weight.device.type != "cpu" or weight.is_mkldnn or not cpu_kernels_enabled():
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    if weight.dtype == torch.float32:
        return True
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def prepack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), BATCH_SIZE_HINT)


def prepack_linears(model: nn.Module, layer_types: tuple[type[nn.Module], ...]) -> int:
    """Replace the weight of every `layer_types` module in `model` by its prepacked copy; returns
    how many were packed. Run it after the weights are loaded: packed weights take no loads."""
    packed = 0
    for module in model.modules():
        if isinstance(module, layer_types) and can_prepack(module.weight):
            module.weight = nn.Parameter(prepack(module.weight), requires_grad=False)
            packed += 1
    return packed

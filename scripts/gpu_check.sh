#!/usr/bin/env bash
# On a CUDA host: Triton kernels against the torch reference on the GPU, engine parity with
# transformers + peft on CUDA (NCCL across ranks when there are several GPUs), then throughput
# in bfloat16. Record what it prints in docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
RAYLORA_TORCH=cuda ./scripts/setup_venv.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.cuda.get_device_name(0))"
.venv/bin/python -m pytest -q tests/lora/test_ops.py -k cuda
.venv/bin/python scripts/gpu_check.py
.venv/bin/python -m cluster.bench.engine engine --device cuda --dtype bfloat16 --num-requests 256 --max-num-seqs 128 --skip transformers
.venv/bin/python -m cluster.bench.engine lora --device cuda --dtype bfloat16 --num-requests 256 --max-num-seqs 128 --skip peft

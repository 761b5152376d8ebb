"""Batched multi-LoRA ops (Punica pattern): one batch, many adapters, one slot index per token.

`backend.LoRABackend` is the contract; a worker picks one implementation when it starts
(`selection.select_backend`): `torch_ops.TorchBackend` (the plain-torch reference),
`cpu_ops.CpuKernelBackend` (torch plus a fused C++ kernel, for float32 on CPU) or
`triton_ops.TritonBackend` (GPU). `metadata` indexes a step's slots for all of them.
"""

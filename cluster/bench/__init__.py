"""Benchmarks: `raylora bench engine|lora|serve`, their workloads, clients and reports."""

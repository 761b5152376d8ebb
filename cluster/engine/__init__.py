"""The engine: requests, scheduling, KV blocks, adapters' registry, the driver actor and its worker group."""

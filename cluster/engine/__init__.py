"""The engine: its core loop (requests, scheduling, KV blocks, adapter slots, outputs), the adapters'
registry, and the two engines that run the core: the driver (over its worker actors) and the
in-process engine (over one worker in this process)."""

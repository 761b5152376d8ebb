"""What the engine core needs from whatever runs the model: steps in, sampled tokens out.

Two implementations: the Ray worker group (`worker_group.WorkerGroup`, its output a future, so the
driver can send the next step while the workers run this one) and one worker in the caller's
process (`in_process.InProcessWorker`, its output the finished `StepOutput`).
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from lora.request import LoRARequest
from workers.step import DecodeContinuation, StepInput

OutputT_co = TypeVar("OutputT_co", covariant=True)


class StepExecutor(Protocol[OutputT_co]):
    def submit(self, step: StepInput | DecodeContinuation) -> OutputT_co:
        """Start the step on every rank (a continuation of the step before it, which they keep);
        returns rank 0's `StepOutput` or a future of it."""
        ...

    async def load_lora(self, lora: LoRARequest) -> None:
        """Every rank reads the adapter into its CPU cache and checks its values; returns when all
        have it, or raises (InvalidRequestError) when one refused it (then none keeps it)."""
        ...

    def remove_lora(self, lora_id: int) -> object:
        """Every rank drops the adapter from its CPU cache."""
        ...

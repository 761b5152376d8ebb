"""What one HTTP request generates: its choices, each on its own engine stream, and their deltas merged.

A request asks for n choices per prompt; each is a separate engine request. They are opened
together (all accepted, or none stays open), read as the engine's deltas arrive (each several
steps merged), and cancelled together when the response ends early.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from cluster.engine.outputs import StreamDelta, TokenLogprob
from cluster.engine.sampling_params import SamplingParams
from cluster.errors import RayLoRAError
from cluster.server.engine_client import EngineClient, EngineStream
from cluster.server.metrics import ChoiceTimer
from cluster.server.openai_protocol import UsageInfo


@dataclass
class Choice:
    """One generated sequence of a response: its prompt, its engine stream, what it produced so far."""

    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    timer: ChoiceTimer
    stream: EngineStream | None = None
    opening: StreamDelta | None = None  # the first delta, which came with the engine's EngineStart
    replica_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    async def open(self, engines: EngineClient, adapter: str | None, stream: bool) -> None:
        """Streamed, the engine's first item carries the first delta; not streamed, the engine sends the
        whole completion as one item after this."""
        self.stream = engines.open_stream(self.prompt_token_ids, self.params, adapter, stream)
        start = await self.stream.__anext__()
        if isinstance(start, RayLoRAError):
            raise start
        self.replica_id = start.replica_id
        self.opening = start.delta

    def absorb(self, delta: StreamDelta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs or []
        self.finish_reason = delta.finish_reason
        self.timer.on_tokens(len(delta.token_ids))
        if delta.finished:
            self.timer.finish()

    async def deltas(self) -> AsyncIterator[StreamDelta]:
        """The engine's deltas (each several steps merged), absorbed as they pass."""
        if self.opening is not None:
            delta, self.opening = self.opening, None
            self.absorb(delta)
            yield delta
            if delta.finished:
                return
        assert self.stream is not None
        async for delta in self.stream:
            self.absorb(delta)
            yield delta

    async def drain(self) -> None:
        async for _ in self.deltas():
            pass


@dataclass
class Generation:
    """Everything one HTTP request generates: n choices per prompt, each on its own engine stream."""

    model: str  # as the client named it, echoed in responses
    metric_label: str
    choices: list[Choice]
    id: str

    @property
    def replica_ids(self) -> str:
        return ",".join(sorted({choice.replica_id for choice in self.choices}))

    def usage(self) -> UsageInfo:
        usage = UsageInfo()
        for choice in self.choices:
            usage.add(len(choice.prompt_token_ids), len(choice.token_ids))
        return usage

    async def open(self, engines: EngineClient, adapter: str | None, stream: bool) -> None:
        """Open one engine stream per choice; all are accepted, or none stays open."""
        opened = await asyncio.gather(*(choice.open(engines, adapter, stream) for choice in self.choices),
                                      return_exceptions=True)
        failures = [result for result in opened if isinstance(result, BaseException)]
        if failures:
            self.close()
            raise failures[0]

    def close(self) -> None:
        """Cancel unfinished engine streams, which aborts their requests in the engines."""
        for choice in self.choices:
            if choice.stream is not None and choice.finish_reason is None:
                choice.stream.cancel()

    async def merged(self) -> AsyncIterator[tuple[Choice, StreamDelta]]:
        """The choices' deltas interleaved as they arrive; one choice (the usual case) needs no tasks."""
        if len(self.choices) == 1:
            choice = self.choices[0]
            try:
                async for delta in choice.deltas():
                    yield choice, delta
            finally:
                self.close()
            return
        queue: asyncio.Queue[tuple[Choice, StreamDelta | BaseException]] = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            try:
                async for delta in choice.deltas():
                    queue.put_nowait((choice, delta))
            except Exception as exc:
                queue.put_nowait((choice, exc))

        tasks = [asyncio.create_task(pump(choice)) for choice in self.choices]
        try:
            unfinished = len(tasks)
            while unfinished:
                choice, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                unfinished -= item.finished
                yield choice, item
        finally:
            for task in tasks:
                task.cancel()
            self.close()

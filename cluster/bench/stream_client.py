"""The benchmark's HTTP client: `/v1/completions` requests sent on a schedule, timed chunk by chunk.

One aiohttp session (one connection pool sized for the whole run) sends every request at its
arrival time, whether or not earlier ones finished: an open-loop client, so a slow server shows
up as latency and backlog instead of silently lowering the offered load. Streamed requests ask
for `return_token_ids`, so each chunk's token count is exact rather than guessed from its text.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from cluster.bench.serve_workload import ServeRequest


@dataclass
class RequestTiming:
    """What the client saw of one request; times are seconds after the run's start."""

    index: int
    output_len: int  # tokens asked for
    scheduled_s: float
    sent_s: float = 0.0
    first_token_s: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    finished_s: float | None = None
    status: int = 0  # HTTP status; 0 when no response came (connection failed)
    error: str | None = None
    token_ids: list[int] = field(default_factory=list)  # streamed ones (a multi-turn client resends them)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.finished_s is not None

    @property
    def num_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.sent_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.finished_s is None else self.finished_s - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first: (e2e - TTFT) / (tokens - 1)."""
        if not self.ok or self.num_tokens < 2 or self.ttft_s is None or self.e2e_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_tokens - 1)

    def inter_token_s(self) -> list[float]:
        """Each chunk's gap to the previous chunk, shared evenly over the chunk's tokens (one entry
        per token after the first): a chunk of k tokens after a gap g counts as k gaps of g/k."""
        gaps: list[float] = []
        for previous, now, tokens in zip(self.chunk_times, self.chunk_times[1:], self.chunk_tokens[1:]):
            if tokens > 0:
                gaps.extend([(now - previous) / tokens] * tokens)
        if self.chunk_tokens and self.chunk_tokens[0] > 1:  # tokens that came with the first one
            gaps.extend([0.0] * (self.chunk_tokens[0] - 1))
        return gaps


def completion_body(model: str, request: ServeRequest, stream: bool) -> dict[str, Any]:
    """A `/v1/completions` body: token-id prompt, exact output length, greedy."""
    body: dict[str, Any] = {
        "model": model, "prompt": request.prompt, "max_tokens": request.output_len, "ignore_eos": True,
        "temperature": 0, "stream": stream, "return_token_ids": True,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


class StreamClient:
    """An open-loop `/v1/completions` client over one connection pool."""

    def __init__(self, base_url: str, api_key: str | None = None, max_connections: int = 512,
                 timeout_s: float = 1800.0) -> None:
        self.url = base_url.rstrip("/") + "/v1/completions"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.max_connections = max_connections
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> StreamClient:
        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=self.max_connections)
        self.session = aiohttp.ClientSession(connector=connector, timeout=self.timeout, headers=self.headers)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.session is not None
        await self.session.close()

    async def send(self, timing: RequestTiming, body: dict[str, Any], clock: Callable[[], float]) -> RequestTiming:
        """Send one request now and fill `timing` in as its answer arrives."""
        assert self.session is not None
        timing.sent_s = clock()
        try:
            async with self.session.post(self.url, json=body) as response:
                timing.status = response.status
                if response.status != 200:
                    timing.error = (await response.text())[:300]
                elif body.get("stream"):
                    await self._read_events(response, timing, clock)
                else:
                    payload = await response.json()
                    timing.first_token_s = timing.finished_s = clock()
                    timing.chunk_times.append(timing.finished_s)
                    timing.chunk_tokens.append(_completion_tokens(payload))
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
            timing.error = f"{type(exc).__name__}: {exc}"
        return timing

    @staticmethod
    async def _read_events(response: aiohttp.ClientResponse, timing: RequestTiming, clock: Callable[[], float]) -> None:
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                timing.finished_s = clock()
                return
            now = clock()
            event = json.loads(data)
            if "error" in event:  # a failure after the headers went out
                timing.error = str(event["error"].get("message", event["error"]))[:300]
                timing.status = int(event["error"].get("code") or 500)
                return
            choices = event.get("choices") or []
            tokens = sum(_choice_tokens(choice) for choice in choices)
            for choice in choices:
                timing.token_ids += choice.get("token_ids") or []
            if tokens:
                timing.first_token_s = timing.first_token_s or now
                timing.chunk_times.append(now)
                timing.chunk_tokens.append(tokens)
        timing.error = "the stream ended without [DONE]"

    async def run(
        self, requests: list[ServeRequest], model_of: Callable[[ServeRequest], str], stream: bool = True,
        on_done: Callable[[RequestTiming], None] | None = None,
    ) -> list[RequestTiming]:
        """Send every request at its arrival time (seconds after now); returns their timings in order."""
        loop = asyncio.get_running_loop()
        start = loop.time()

        def clock() -> float:
            return loop.time() - start

        async def one(request: ServeRequest) -> RequestTiming:
            await asyncio.sleep(max(0.0, request.arrival_s - clock()))
            timing = RequestTiming(request.index, request.output_len, request.arrival_s)
            await self.send(timing, completion_body(model_of(request), request, stream), clock)
            if on_done is not None:
                on_done(timing)
            return timing

        return list(await asyncio.gather(*(one(request) for request in requests)))


def _choice_tokens(choice: dict[str, Any]) -> int:
    """Tokens one streamed choice carries: its token ids, or one per non-empty text chunk."""
    token_ids = choice.get("token_ids")
    if token_ids is not None:
        return len(token_ids)
    return 1 if choice.get("text") else 0


def _completion_tokens(payload: dict[str, Any]) -> int:
    usage = payload.get("usage") or {}
    if usage.get("completion_tokens") is not None:
        return int(usage["completion_tokens"])
    return sum(len(choice.get("token_ids") or []) for choice in payload.get("choices") or [])

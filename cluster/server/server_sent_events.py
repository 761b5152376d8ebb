"""A streamed response's body: OpenAI's server-sent events, `data: {json}` each, then `data: [DONE]`.

The HTTP status and headers are already out when a failure meets the stream, so it becomes an
error event instead; the request's outcome is counted when the stream ends, however it ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from pydantic import BaseModel

from cluster.server.error_responses import describe_error, is_unexpected
from cluster.server.generation import Generation
from cluster.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


async def server_sent_events(
    generation: Generation, chunks: AsyncIterator[BaseModel], metrics: ServerMetrics
) -> AsyncIterator[str]:
    """`chunks` as events; a failure after the headers went out is an error event before [DONE]."""
    status = "ok"
    try:
        async for chunk in chunks:
            yield f"data: {chunk.model_dump_json()}\n\n"
    except asyncio.CancelledError:
        status = "disconnected"
        raise
    except Exception as exc:
        error = describe_error(exc)
        status = str(error.error.code)
        if is_unexpected(error.error.code, exc):
            logger.error("stream failed (answered %s)", status, exc_info=exc)
        yield f"data: {error.model_dump_json()}\n\n"
    finally:
        metrics.requests.labels(generation.metric_label, status).inc()
        generation.close()
    yield "data: [DONE]\n\n"

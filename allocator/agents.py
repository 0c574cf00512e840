"""The allocator as Faust agents: the node table, submissions, escrow and reissues in,
``TaskAssigned`` out. The decisions are ``allocator.service.Allocator``'s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import faust

from allocator.service import Allocator
from destra.settings import Settings
from schemas import Event
from schemas.events import now_ms
from streams.faust_app import Origin, Publisher, broker_ms, topics

INPUTS = ("NodeRegistered", "NodeHeartbeat", "TaskSubmitted", "LedgerEntryPosted",
          "TaskVerified", "TaskFailed", "ReissueRequested", "ResultCommitted")
TICK_S = 0.25


def install(app: faust.App, settings: Settings, allocator: Allocator,
            publisher: Publisher) -> None:
    """Register the allocator's agent and its timer on ``app``."""
    handlers: dict[str, Callable[[Event, int], list[Event]]] = {
        "NodeRegistered": allocator.on_registered,
        "NodeHeartbeat": allocator.on_heartbeat,
        "TaskSubmitted": allocator.on_submitted,
        "LedgerEntryPosted": allocator.on_entry,
        "TaskVerified": allocator.on_verified,
        "TaskFailed": allocator.on_failed,
        "ReissueRequested": allocator.on_reissue,
        "ResultCommitted": allocator.on_committed,
    }

    @app.agent(topics(app, settings, *INPUTS), name="allocator")
    async def allocate(stream: Any) -> None:
        async for record in stream.events():
            event = record.value
            handler = handlers.get(event.name)
            if handler is None:
                continue
            await publisher.publish(handler(event, broker_ms(record.message)))
            if allocator.rejected:
                origin = Origin.of(record.message)
                await publisher.reject([(e, origin, why) for e, why in allocator.rejected])
                allocator.rejected.clear()

    @app.timer(interval=TICK_S, name="allocator-tick")
    async def tick() -> None:
        await publisher.publish(allocator.on_tick(now_ms()))

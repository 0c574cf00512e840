"""Proof of Sync as Faust agents: registrations, submissions, assignments, commits and
reveals in; verdicts, reveal calls, reissues and penalties out. The decisions are
``verifier.service.Verifier``'s, around the pure ``TaskTally``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import faust

from destra.settings import Settings
from schemas import Event
from schemas.events import now_ms
from streams.faust_app import Origin, Publisher, broker_ms, topics
from verifier.service import Verifier

INPUTS = ("NodeRegistered", "TaskSubmitted", "TaskAssigned", "ResultCommitted",
          "ResultRevealed")
TICK_S = 0.25


def install(app: faust.App, settings: Settings, verifier: Verifier,
            publisher: Publisher) -> None:
    """Register the verifier's agent and its deadline timer on ``app``."""
    handlers: dict[str, Callable[[Event, int, Any], list[Event]]] = {
        "NodeRegistered": verifier.on_registered,
        "TaskSubmitted": verifier.on_submitted,
        "TaskAssigned": verifier.on_assigned,
        "ResultCommitted": verifier.on_committed,
        "ResultRevealed": verifier.on_revealed,
    }

    @app.agent(topics(app, settings, *INPUTS), name="verifier")
    async def verify(stream: Any) -> None:
        async for record in stream.events():
            event = record.value
            handler = handlers.get(event.name)
            if handler is None:
                continue  # DataKeyGranted, RevealOpened share the assignments topic
            out = handler(event, broker_ms(record.message), Origin.of(record.message))
            await publisher.publish(out)
            if verifier.rejected:
                await publisher.reject(verifier.rejected)

    @app.timer(interval=TICK_S, name="verifier-tick")
    async def tick() -> None:
        await publisher.publish(verifier.on_tick(now_ms()))
        if verifier.rejected:
            await publisher.reject(verifier.rejected)

"""A tiny Faust worker for the codec test: reads heartbeats, writes them to an echo topic.

Run as ``python tests/faust_echo_app.py worker``; bootstrap and topic prefix
come from ``DESTRA_KAFKA_BOOTSTRAP`` and ``DESTRA_TOPIC_PREFIX``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from destra.settings import Settings  # noqa: E402
from schemas import Event  # noqa: E402
from streams.faust_app import make_app, topic  # noqa: E402

settings = Settings.from_env()
assert settings.kafka_bootstrap
app = make_app(settings, f"echo-{settings.topic_prefix.rstrip('.')}", settings.kafka_bootstrap)
heartbeats = topic(app, settings, "nodes.heartbeats")
echo = topic(app, settings, "echo")


@app.agent(heartbeats)
async def forward(stream):  # type: ignore[no-untyped-def]
    """Forward every decoded heartbeat, re-encoded by the same codec."""
    async for key, event in stream.items():
        assert isinstance(event, Event) and event.name == "NodeHeartbeat"
        await echo.send(key=key, value=event)


if __name__ == "__main__":
    app.main()

"""The allocator as Faust agents: the node table, submissions, escrow and reissues in,
``TaskAssigned`` out. The decisions are ``allocator.service.Allocator``'s."""

from __future__ import annotations

import faust

from allocator.service import Allocator
from destra.settings import Settings
from streams.faust_app import Publisher, install_service


def install(app: faust.App, settings: Settings, allocator: Allocator,
            publisher: Publisher) -> None:
    """Register the allocator's agent and its timer on ``app``."""
    install_service(app, settings, "allocator", {
        "NodeRegistered": allocator.on_registered,
        "NodeHeartbeat": allocator.on_heartbeat,
        "TaskSubmitted": allocator.on_submitted,
        "LedgerEntryPosted": allocator.on_entry,
        "TaskVerified": allocator.on_verified,
        "TaskFailed": allocator.on_failed,
        "ReissueRequested": allocator.on_reissue,
        "ResultCommitted": allocator.on_committed,
        "ResultRevealed": allocator.on_revealed,
    }, allocator.rejected, allocator.on_tick, publisher)

"""Proof of Sync as Faust agents: registrations, submissions, assignments, commits and
reveals in; verdicts, reveal calls, reissues and penalties out. The decisions are
``verifier.service.Verifier``'s, around the pure ``TaskTally``."""

from __future__ import annotations

import faust

from destra.settings import Settings
from streams.faust_app import Publisher, install_service
from verifier.service import Verifier


def install(app: faust.App, settings: Settings, verifier: Verifier,
            publisher: Publisher) -> None:
    """Register the verifier's agent and its deadline timer on ``app``."""
    install_service(app, settings, "verifier", {
        "NodeRegistered": verifier.on_registered,
        "TaskSubmitted": verifier.on_submitted,
        "TaskAssigned": verifier.on_assigned,
        "DataKeyGranted": verifier.on_granted,
        "ResultCommitted": verifier.on_committed,
        "ResultRevealed": verifier.on_revealed,
    }, verifier.rejected, verifier.on_tick, publisher)

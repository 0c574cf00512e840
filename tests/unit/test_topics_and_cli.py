"""The topic catalogue agrees with the event catalogue; the CLI documents itself."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from destra.cli import cli
from destra.errors import ConfigError
from destra.settings import Settings
from schemas import default_catalog
from streams.topics import TOPICS, topic_for


def test_every_event_type_has_exactly_one_topic() -> None:
    names = default_catalog().names
    carried = [e for t in TOPICS for e in t.events]
    assert sorted(carried) == sorted(names)


def test_every_topic_key_is_a_top_level_field_of_its_events() -> None:
    catalog = default_catalog()
    for topic in TOPICS:
        for event in topic.events:
            fields = {f["name"] for f in catalog.schema_json(event)["fields"]}
            assert topic.key in fields, f"{event} on {topic.suffix} has no {topic.key}"


def test_state_topics_are_compacted_and_history_is_kept_forever() -> None:
    assert topic_for("NodeRegistered").cleanup == "compact"
    for event in ("TaskSubmitted", "ResultRevealed", "LedgerEntryPosted", "TaskVerified",
                  "PriceUpdated", "ParameterChanged", "ProposalSubmitted"):
        assert topic_for(event).retention_ms == -1 and topic_for(event).cleanup == "delete"


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out += _commands(command, (*prefix, name))
        else:
            out.append((*prefix, name))
    return out


@pytest.mark.parametrize("path", _commands(cli), ids=lambda p: " ".join(p) or "destra")
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) > 3


def test_settings_come_from_the_environment_and_flags_override() -> None:
    env = {"DESTRA_HOME": "/tmp/x", "DESTRA_KAFKA_BROKERS": "3", "DESTRA_KAFKA_PORT": "20000"}
    s = Settings.from_env(env, kafka_port=21000)
    assert s.home == Path("/tmp/x") and s.kafka_brokers == 3 and s.kafka_port == 21000
    assert s.replication_factor == 3 and s.min_insync_replicas == 2
    assert Settings.from_env({}).min_insync_replicas == 1


@pytest.mark.parametrize("env, message", [
    ({"DESTRA_KAFKA_BROKERS": "2"}, "kafka_brokers must be 1 or 3"),
    ({"DESTRA_KAFKA_PORT": "http"}, "DESTRA_KAFKA_PORT must be an integer"),
    ({"DESTRA_KAFKA_HEAP_MB": "64"}, "kafka_heap_mb too small"),
])
def test_bad_settings_are_refused_with_the_reason(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_schemas_check_passes_on_the_shipped_catalogue() -> None:
    result = CliRunner().invoke(cli, ["schemas", "check"])
    assert result.exit_code == 0, result.output
    assert "25 schemas are released" in result.output


def test_kafka_cluster_ids_never_look_like_command_line_options() -> None:
    import base64

    from infra.kafka import new_cluster_id

    ids = [new_cluster_id() for _ in range(2000)]  # ~31 would start with "-" unfiltered
    assert not any(i.startswith("-") for i in ids)
    assert all(len(base64.urlsafe_b64decode(i + "==")) == 16 for i in ids)

"""Where librdkafka's own log lines go: Python logging, not the user's terminal.

A fresh broker makes clients log "coordinator load in progress: retrying"
and the like; those are expected and belong in a log, not on stdout.
"""

import logging

KAFKA_LOG = logging.getLogger("destra.kafka")
KAFKA_LOG.addHandler(logging.NullHandler())

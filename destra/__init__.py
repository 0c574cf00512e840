"""Destra: a decentralized GPU compute network, event-sourced over Apache Kafka.

This package holds what every other top-level package shares (settings,
errors) and the ``destra`` command-line interface.
"""

__version__ = "0.1.0"

"""What a long operation tells its caller as it goes (``infra.services.up``'s ``say``)."""

from __future__ import annotations


class Step(str):
    """A note that begins a step of a long operation (``infra up``'s Kafka start, its
    migrations...); any other note is a message. A plain ``str`` subclass, so a ``say``
    callback that only prints notes prints these as well."""

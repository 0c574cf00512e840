"""The Avro event catalogue and its single-object codec."""

from schemas.catalog import Catalog, default_catalog
from schemas.codec import decode, encode
from schemas.events import Event, new_event

__all__ = ["Catalog", "Event", "decode", "default_catalog", "encode", "new_event"]

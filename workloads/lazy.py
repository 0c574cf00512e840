"""torch, imported on its first use rather than with the workloads.

The workloads' specs (names, parameters, compute units) are read by processes that
never run one: the allocator, the auditor, the client and the CLI. Importing torch
costs them about 1.3 s of CPU at every start (2-core machine), so the workload modules
take ``torch`` from here: a module that ``importlib.util.LazyLoader`` loads when an
attribute is first read (the recipe in the ``importlib`` documentation). A process that
has imported torch already gets that module.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import TYPE_CHECKING


def lazy_module(name: str) -> ModuleType:
    """``name``'s module, executed on first attribute access."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


if TYPE_CHECKING:
    import torch  # the type checker sees torch itself
else:
    torch = lazy_module("torch")

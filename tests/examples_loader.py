"""Import a script of ``examples/`` as a module, for tests of the examples."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@contextmanager
def example_module(filename: str) -> Iterator[ModuleType]:
    """``examples/<filename>`` imported and registered in ``sys.modules`` while the context lasts
    (dataclasses look their module up there)."""
    name = f"example_{Path(filename).stem}"
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)

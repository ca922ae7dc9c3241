"""Learning-rate range tests for PyTorch, as a library and as a service.

The names that need torch (``range_test``, ``run_study``) load on first use,
so that the API process, which imports ``lrfinder.spec``, never imports torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "range_test": "lrfinder.engine",
    "RangeTestResult": "lrfinder.engine",
    "run_study": "lrfinder.study",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'lrfinder' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)

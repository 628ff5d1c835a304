"""t2i: text-to-image models on one shared, kernel-accelerated core.

Kept light on import: submodules (data, models, training) are imported where used, or on
first attribute access: `import t2i; t2i.pipelines.load("runs/muse_shapes")`.
"""

import importlib

__version__ = "0.1.0"
_LAZY = ("data", "eval", "generate", "images", "models", "modules", "pipelines", "training")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"t2i.{name}")
    raise AttributeError(f"module 't2i' has no attribute {name!r}")

"""t2i: text-to-image models on one shared, kernel-accelerated core.

Kept light on import: submodules (data, models, training) are imported where used.
"""

__version__ = "0.1.0"

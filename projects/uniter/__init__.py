"""The UNITER project: registers its model (and converters) into vlframe's registries.

A config reaches it with ``custom_imports: [projects.uniter]``.
"""
from projects.uniter.uniter import model  # noqa: F401

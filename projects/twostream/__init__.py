"""A two-stream V+L encoder (LXMERT / ViLBERT family): registers ``TwoStreamModel`` into MODELS.

A config reaches it with ``custom_imports: [projects.twostream]``.
"""
from projects.twostream.twostream import model  # noqa: F401

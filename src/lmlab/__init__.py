"""lmlab: the August 2023 research roundup as working, tested components (see README and registry.py)."""

__version__ = "0.1.0"

"""reconciler: a GitOps reconciler daemon that records every deployment in SQL."""

__version__ = "0.1.0"

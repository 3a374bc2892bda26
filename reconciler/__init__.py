"""reconciler: a GitOps reconciler daemon that records every deployment in SQL."""

__version__ = "0.1.0"
#: The distribution on the package index (pip install gitops-reconciler): "reconciler" there
#: is somebody else's. The command and the import package are `reconciler`.
DISTRIBUTION = "gitops-reconciler"

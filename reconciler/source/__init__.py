"""The git side of the reconciler: fetch the desired-state branch, read it, watch it.

- :mod:`~reconciler.source.gitcmd`: running git (timeouts, no prompts, scrubbed errors);
- :mod:`~reconciler.source.tree`: reading environment files of a commit without checkout;
- :mod:`~reconciler.source.mirror`: :class:`GitSource`, the bare mirror in the state
  directory that everything is read from;
- :mod:`~reconciler.source.watch`: commits into a local repository as signals
  (inotify), and the jitter of polls;
- :mod:`~reconciler.source.signatures`: whether a head is signed by a trusted key
  (`repository.allowed_signers`).
"""

from reconciler.source.gitcmd import SourceError
from reconciler.source.mirror import GitSource
from reconciler.source.signatures import SignatureVerifier, Verdict
from reconciler.source.tree import Changes, CommitInfo
from reconciler.source.watch import poll_delay, watch_refs

__all__ = [
    "Changes",
    "CommitInfo",
    "GitSource",
    "SignatureVerifier",
    "SourceError",
    "Verdict",
    "poll_delay",
    "watch_refs",
]

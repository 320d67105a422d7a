"""A per-thread switch that a `with` block turns on: one thread tracing or loading must not
change what another thread's layers do meanwhile."""

import contextlib
import threading


class ThreadFlag:
    """A boolean per thread, True inside `with flag.raised():` (nested blocks restore it).

    Example:
    >>> in_place = ThreadFlag()
    >>> with in_place.raised():
    ...     assert in_place.is_raised()
    """

    def __init__(self):
        self._local = threading.local()

    def is_raised(self):
        return getattr(self._local, "raised", False)

    @contextlib.contextmanager
    def raised(self):
        previous = self.is_raised()
        self._local.raised = True
        try:
            yield
        finally:
            self._local.raised = previous

"""Example workers, each runnable as ``python -m workers NAME`` and each with a ``build()``
that returns the :class:`~workers.Worker` (tests and other programs embed it)."""

"""meetstream-gateway: Meetstream bot WebSockets bridged to Redis Streams.

The sans-I/O core sits at the top of the package (:mod:`gateway.protocol`,
:mod:`gateway.commands`, :mod:`gateway.keys`); the socket side is
:mod:`gateway.bot_server`, the Redis side :mod:`gateway.publisher` and
:mod:`gateway.command_reader`, and :mod:`gateway.app` owns the lifecycle.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    # pyproject.toml's [project] version is the one place it is written (the chart's
    # appVersion follows it, tests/unit/test_version.py).
    __version__ = version("meetstream-gateway")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

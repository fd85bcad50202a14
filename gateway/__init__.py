"""meetstream-gateway: Meetstream bot WebSockets bridged to Redis Streams.

The sans-I/O core sits at the top of the package (:mod:`gateway.protocol`,
:mod:`gateway.commands`, :mod:`gateway.keys`); the socket side is
:mod:`gateway.bot_server`, the Redis side :mod:`gateway.publisher` and
:mod:`gateway.command_reader`, and :mod:`gateway.app` owns the lifecycle.
"""

__version__ = "0.1.0"

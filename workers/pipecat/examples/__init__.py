"""Pipecat example agents (need the ``pipecat`` extra)."""

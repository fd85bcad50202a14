"""Test doubles that speak the real protocols: a simulated Meetstream bot, and
helpers that start real ``redis-server`` processes (single node and Cluster)."""

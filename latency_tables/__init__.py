"""Latency lookup tables: per-device measurements of every block a search space or arch needs,
and the backends that measure them."""

"""Offline renderer of burst/target training shards (see DESIGN.md)."""

__version__ = "0.1.0"

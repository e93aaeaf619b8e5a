"""Offline renderer of burst/target training shards: config -> sources -> kernels -> imaging ->
shards, mapped over Ray or a process pool (docs/design.md describes the modules)."""

__version__ = "0.1.0"

"""The engine's core: config schema, Parquet log contract, Arrow -> Batch, metrics, CLI.

Imports nothing from `tables`, `models` or `pipelines` (dependencies point the other way).
"""

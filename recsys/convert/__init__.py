"""Converters of public logs (Criteo) to the project's Parquet log contract."""

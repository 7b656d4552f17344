"""Converters of public logs to the project's Parquet log contract: Criteo (`criteo`),
libsvm / libfm (`libsvm`), CSV / TSV by a feature spec (`delimited`, spec in `csv_spec`)
and MovieLens-100K as CTR and sequence logs (`movielens`)."""

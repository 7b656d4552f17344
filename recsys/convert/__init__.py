"""Converters of public logs to the project's Parquet log contract: Criteo (`criteo`),
libsvm / libfm (`libsvm`, its tokenizer in `libsvm_reader`), CSV / TSV by a feature spec
(`delimited`, spec in `csv_spec`) and MovieLens-100K as CTR and sequence logs
(`movielens`). They share the text input (`criteo.TextFile`, `criteo.string_batches`),
the cell converters (`cells`) and the staged, day-partitioned output (`day_log`)."""

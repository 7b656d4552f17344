"""Ray jobs: reading logs, training, evaluation, export, search."""

"""Embedding storage and its variants; sharding plans and sharders."""

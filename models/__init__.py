"""Dense architectures (CTR and long-sequence models); blind to the table variant."""

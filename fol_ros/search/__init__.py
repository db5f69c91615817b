"""Stage 4: the place map on disk and in memory, and retrieval over its global descriptors."""

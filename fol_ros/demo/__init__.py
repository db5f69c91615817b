"""The `make demo` job: a deterministic two-traversal sequence from real photographs, replayed into the node."""

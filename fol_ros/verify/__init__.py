"""Stage 6: geometric verification (geometry.py) and the loop-closure decision (gate.py)."""

"""Map-directory operations under their historical names; the map store (`store.py`) implements them.

Kept so that callers of `read_metadata`, `read_calibration` and `write_calibration` keep working. It imports only
the store (never place_map), so there is no import cycle.
"""
from __future__ import annotations

from fol_ros.search.metadata import CALIBRATION_NAME, model_of
from fol_ros.search.store import read_calibration, read_map, read_metadata, verify_files, write_calibration

__all__ = ['CALIBRATION_NAME', 'model_of', 'read_calibration', 'read_map', 'read_metadata', 'verify_files',
           'write_calibration']

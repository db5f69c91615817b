"""Errors raised by the core. Every message says what is wrong and what to do about it.

The node catches these at its callback boundary and turns them into a status (never a crash); the CLI prints
them without a traceback and exits non-zero.
"""


class FolError(Exception):
    """Base class of every error the core raises on purpose."""


class ConfigError(FolError, ValueError):
    """A setting is out of range or names something that does not exist."""


class BadInputError(FolError, ValueError):
    """An image (or other input) cannot be used: wrong encoding, empty, corrupt, wrong size."""


class CheckpointError(FolError):
    """A checkpoint is missing, unreadable, or its keys/shapes do not match the model."""


class MapError(FolError):
    """A place map is missing, damaged (checksum, truncation) or from a different format version."""


class MapMismatchError(MapError):
    """A place map was built with a different model (fingerprint) than the one running."""


class EngineError(FolError):
    """An inference engine is unavailable or failed (ONNX Runtime, TensorRT, CUDA)."""

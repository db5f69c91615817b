"""Append-only on-disk store of ragged fp16 local tokens, so an evaluation never holds N x 1.84 MB in RAM.

fol-method §14 quirk 22: the official test pre-allocates every image's 3600x128 fp32 tokens in RAM (Pitts250k
about 170 GB). Here each image's valid tokens are appended as fp16 to one file and read back through a memmap.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fol_ros.errors import BadInputError


class TokenStore:
    """Ragged [L_i, D] fp16 arrays appended to one file; `get(i)` returns a read-only view after `finish()`."""

    def __init__(self, path: str | Path, dim: int = 128) -> None:
        self.path = Path(path)
        self.dim = int(dim)
        self._offsets: list[int] = [0]
        self._file = open(self.path, 'wb')
        self._data: np.memmap | None = None

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def append(self, tokens: np.ndarray) -> int:
        """Store one image's tokens [L, dim]; returns its index."""
        if self._file is None:
            raise BadInputError(f'{self.path}: token store already finished; create a new one to add more')
        t = np.asarray(tokens)
        if t.ndim != 2 or t.shape[1] != self.dim:
            raise BadInputError(f'local tokens must be [L, {self.dim}], got {list(t.shape)}')
        self._file.write(np.ascontiguousarray(t, dtype=np.float16).tobytes())
        self._offsets.append(self._offsets[-1] + t.shape[0])
        return len(self) - 1

    def finish(self) -> TokenStore:
        """Flush the file and map it for reading."""
        if self._file is not None:
            self._file.close()
            self._file = None
        rows = self._offsets[-1]
        self._data = (np.memmap(self.path, dtype=np.float16, mode='r', shape=(rows, self.dim)) if rows
                      else np.zeros((0, self.dim), dtype=np.float16))
        return self

    def get(self, i: int) -> np.ndarray:
        """Tokens of image i, fp16 [L_i, dim] (a view into the file)."""
        if self._data is None:
            self.finish()
        return self._data[self._offsets[i]:self._offsets[i + 1]]

    def close(self, delete: bool = True) -> None:
        """Release the file; delete it unless asked to keep it."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._data = None
        if delete and self.path.exists():
            os.unlink(self.path)

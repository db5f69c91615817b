"""How a map stores its local tokens: fp16 (default), fp32 (exactly what the encoder gave: the official pipeline's
counts, twice the disk), int8 with a per-token scale, or product quantisation (PQ, optionally with an OPQ rotation)
trained on the map's own tokens.

The re-ranker works on decoded tokens: `PlaceMap.local_tokens` decodes one place's codes into float32 [L, d] when it
is asked for them (a gather from the codebook and, with OPQ, one [L, d] x [d, d] product: well under a millisecond
beside the re-ranking GEMMs), so the exact fused re-ranker (`fol_ros.mutual_nn`) runs unchanged on whatever the map
holds, and the geometric verification gets the same pairs it would from fp16 tokens of those values.

Bytes per token (d = 128): fp16 256; fp32 512; int8 128 + 2 (fp16 scale); pq m bytes (m sub-quantisers of 256 centroids,
d/m dimensions each). Per map: pq adds its codebook (m x 256 x d/m float32 = 128 KB at d = 128) and with OPQ a d x d
rotation (64 KB).

Files (beside local_index.npy, local_xy.npy, local_offsets.npy, which every map has):
    fp16  local.npy float16 [sum L, d]
    fp32  local.npy float32 [sum L, d]
    int8  local.npy int8 [sum L, d], local_scale.npy float16 [sum L]: token = codes * scale (symmetric, per token)
    pq    local.npy uint8 [sum L, m], local_codebook.npy float32 [m, 256, d/m], local_rotation.npy float32 [d, d]
          (OPQ only): token = concat_j codebook[j, codes[:, j]] @ rotation, unit-normalised when `normalize`
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from fol_ros.errors import MapError

KINDS = ('fp16', 'fp32', 'int8', 'pq')
FLOAT_KINDS = ('fp16', 'fp32')    # stored as they are used: no decoding
PQ_BITS = 8
PQ_CENTROIDS = 1 << PQ_BITS
DEFAULT_PQ_M = 32            # 4 dims per sub-quantiser at d = 128: 32 bytes per token
TRAIN_TOKENS = 1 << 16       # tokens sampled from the map to train PQ / OPQ (faiss's own cap: 256 per centroid)
OPQ_ITERATIONS = 10          # OPQ rotation / codebook alternations (faiss default 50; 10 takes ~30 s on 2 cores)
SCALE_FILE = 'local_scale.npy'
CODEBOOK_FILE = 'local_codebook.npy'
ROTATION_FILE = 'local_rotation.npy'
LOCAL_DTYPE = {'fp16': 'float16', 'fp32': 'float32', 'int8': 'int8', 'pq': 'uint8'}


def working_dtype(kind: str) -> str:
    """dtype of tokens held in memory and in the append log until a save codes them: fp32 for an fp32 map (its
    tokens are never rounded), fp16 for every other encoding."""
    return 'float32' if kind == 'fp32' else 'float16'


@dataclass(frozen=True)
class TokenOptions:
    """What `fol-ros map build --tokens` asks for; a PQ codec is trained from it on the map's tokens."""

    kind: str = 'fp16'
    pq_m: int = DEFAULT_PQ_M
    opq: bool = True
    normalize: bool = True
    train_tokens: int = TRAIN_TOKENS
    opq_iterations: int = OPQ_ITERATIONS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MapError(f'token encoding {self.kind!r} is not one of {", ".join(KINDS)}')


@dataclass(frozen=True, eq=False)
class TokenCodec:
    """A map's token encoding, trained when it is PQ. `encode`/`decode` work on one place's [L, d] tokens."""

    kind: str
    dim: int
    pq_m: int = 0
    opq: bool = False
    normalize: bool = False
    train_tokens: int = 0
    codebook: np.ndarray | None = field(default=None, repr=False)   # float32 [m, 256, d/m]
    rotation: np.ndarray | None = field(default=None, repr=False)   # float32 [d, d]: rotated = x @ rotation.T

    # ----- identity and layout ---------------------------------------------------------------------------------
    @property
    def local_dtype(self) -> str:
        """dtype of local.npy."""
        return LOCAL_DTYPE[self.kind]

    @property
    def columns(self) -> int:
        """Columns of local.npy (d, or m for PQ)."""
        return self.pq_m if self.kind == 'pq' else self.dim

    @property
    def token_files(self) -> tuple[str, ...]:
        """Per-token side arrays (one row per token, sliced like local.npy)."""
        return (SCALE_FILE,) if self.kind == 'int8' else ()

    @property
    def map_files(self) -> tuple[str, ...]:
        """Whole-map arrays of the codec (codebook, rotation)."""
        if self.kind != 'pq':
            return ()
        return (CODEBOOK_FILE, ROTATION_FILE) if self.opq else (CODEBOOK_FILE,)

    @property
    def files(self) -> tuple[str, ...]:
        return self.token_files + self.map_files

    def bytes_per_token(self) -> int:
        return {'fp16': 2 * self.dim, 'fp32': 4 * self.dim, 'int8': self.dim + 2, 'pq': self.pq_m}[self.kind]

    def params(self) -> dict:
        """The `local_codec` entry of metadata.json."""
        if self.kind in FLOAT_KINDS:
            return {'kind': self.kind}
        if self.kind == 'int8':
            return {'kind': 'int8', 'scale_dtype': 'float16'}
        return {'kind': 'pq', 'm': self.pq_m, 'nbits': PQ_BITS, 'opq': self.opq, 'normalize': self.normalize,
                'train_tokens': self.train_tokens}

    def same_as(self, other: 'TokenCodec | None') -> bool:
        """True when codes of `other` decode identically with this codec (they can be copied, not re-encoded)."""
        if other is None or other.kind != self.kind or other.dim != self.dim or other.params() != self.params():
            return False
        return all((a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
                   for a, b in ((self.codebook, other.codebook), (self.rotation, other.rotation)))

    def map_arrays(self) -> dict[str, np.ndarray]:
        """The whole-map files to write."""
        out = {}
        if self.kind == 'pq':
            out[CODEBOOK_FILE] = np.ascontiguousarray(self.codebook, np.float32)
            if self.opq:
                out[ROTATION_FILE] = np.ascontiguousarray(self.rotation, np.float32)
        return out

    # ----- coding --------------------------------------------------------------------------------------------
    def encode(self, tokens: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """(codes [L, columns] of local_dtype, per-token side arrays in `token_files` order) of [L, d] tokens."""
        x = np.asarray(tokens)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise MapError(f'tokens of shape {x.shape} do not fit a codec of dimension {self.dim}')
        if self.kind in FLOAT_KINDS:
            return np.ascontiguousarray(x, LOCAL_DTYPE[self.kind]), ()
        x = np.asarray(x, np.float32)
        if self.kind == 'int8':
            peak = np.abs(x).max(1) if len(x) else np.zeros(0, np.float32)
            scale = (peak / 127.0).astype(np.float16)
            s = scale.astype(np.float32)
            safe = np.where(s > 0, s, 1.0)[:, None]
            codes = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
            return codes, (scale,)
        return _pq_codes(self.codebook, x @ self.rotation.T if self.opq else x), ()

    def decode(self, codes: np.ndarray, side: tuple[np.ndarray, ...] = ()) -> np.ndarray:
        """float32 [L, d] tokens of one place's codes (and its per-token side arrays)."""
        if self.kind in FLOAT_KINDS:
            return np.asarray(codes)
        if self.kind == 'int8':
            return np.asarray(codes, np.float32) * np.asarray(side[0], np.float32)[:, None]
        m, k, dsub = self.codebook.shape
        flat = np.asarray(codes, np.intp) + np.arange(0, m * k, k)   # row of each code in the [m * 256, dsub] table
        out = self.codebook.reshape(m * k, dsub).take(flat, 0).reshape(len(flat), m * dsub)
        if self.opq:
            out = out @ self.rotation
        if self.normalize and len(out):
            norm = np.sqrt(np.einsum('ij,ij->i', out, out))
            out /= np.where(norm > 0, norm, 1.0)[:, None]
        return np.ascontiguousarray(out, np.float32)


def _pq_codes(codebook: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Nearest centroid of every sub-vector (squared L2), uint8 [L, m]; chunked to bound the distance table."""
    m, k, dsub = codebook.shape
    out = np.empty((len(x), m), np.uint8)
    sub = x.reshape(len(x), m, dsub)
    c2 = np.einsum('mkd,mkd->mk', codebook, codebook)
    for a in range(0, len(x), 4096):
        s = sub[a:a + 4096]
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 is the same for every centroid of a sub-vector
        dist = c2[None] - 2 * np.einsum('lmd,mkd->lmk', s, codebook)
        out[a:a + 4096] = dist.argmin(2)
    return out


def fp16_codec(dim: int) -> TokenCodec:
    return TokenCodec('fp16', int(dim))


def train(options: TokenOptions, dim: int, sample: np.ndarray) -> TokenCodec:
    """A codec for `options`; PQ (and OPQ) are trained on `sample` [n, d] (tokens drawn from the map)."""
    if options.kind in ('fp16', 'fp32', 'int8'):
        return TokenCodec(options.kind, int(dim))
    m = int(options.pq_m)
    if m < 1 or dim % m:
        raise MapError(f'PQ with {m} sub-quantisers needs a token dimension divisible by it (the map has {dim})')
    x = np.ascontiguousarray(sample, np.float32)
    if len(x) < PQ_CENTROIDS:
        raise MapError(f'PQ needs at least {PQ_CENTROIDS} tokens to train its codebook; the map has {len(x)} '
                       '(use --tokens int8 or fp16 for a map this small)')
    import faiss
    rotation = None
    if options.opq:
        opq = faiss.OPQMatrix(dim, m)
        opq.niter = int(options.opq_iterations)
        opq.max_train_points = len(x)
        opq.train(x)
        rotation = faiss.vector_to_array(opq.A).reshape(dim, dim).astype(np.float32)
        x = x @ rotation.T
    pq = faiss.ProductQuantizer(dim, m, PQ_BITS)
    pq.cp.max_points_per_centroid = max(1, -(-len(x) // PQ_CENTROIDS))
    pq.cp.min_points_per_centroid = 1   # a small map trains on what it has (faiss would warn below 39 per centroid)
    pq.cp.seed = int(options.seed)
    pq.train(x)
    codebook = faiss.vector_to_array(pq.centroids).reshape(m, PQ_CENTROIDS, dim // m).astype(np.float32)
    return TokenCodec('pq', int(dim), m, bool(options.opq), bool(options.normalize), len(sample), codebook, rotation)


def sample_tokens(token_arrays, count: int, total: int, seed: int = 0) -> np.ndarray:
    """About `count` tokens drawn uniformly from the places' token arrays (an iterable of [L_i, d], sum L = total),
    float32, in one pass."""
    rng = np.random.default_rng(seed)
    p = min(1.0, count / max(1, total))
    parts = []
    for arr in token_arrays:
        if p >= 1.0:
            parts.append(np.asarray(arr, np.float32))
        else:
            keep = np.nonzero(rng.random(len(arr)) < p)[0]
            parts.append(np.asarray(arr[keep], np.float32))
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def from_metadata(params: dict, dim: int, arrays: dict[str, np.ndarray]) -> TokenCodec:
    """The codec of a map from its (validated) `local_codec` entry and its codec files."""
    kind = params['kind']
    if kind in ('fp16', 'fp32', 'int8'):
        return TokenCodec(kind, int(dim))
    m = params['m']
    return TokenCodec('pq', int(dim), m, params['opq'], params['normalize'], params['train_tokens'],
                      arrays[CODEBOOK_FILE], arrays.get(ROTATION_FILE))


def timed_train(options: TokenOptions, dim: int, sample: np.ndarray) -> tuple[TokenCodec, float]:
    t0 = time.perf_counter()
    codec = train(options, dim, sample)
    return codec, time.perf_counter() - t0

"""Real FoL encodings of the Corridor set and of the demo route, encoded once and cached (shared by the token and
scale benches).

    .venv/bin/python bench/token_sets.py [--sets corridor demo]    # fills the cache, prints what it holds

Corridor: ../shared/data/corridor (ref/ = the map, query/, ground_truth_new.npy). Demo: fol_ros/demo/sequence.py
(traversal 1 = the map, traversal 2 = queries; a place is correct within 3 m of the query's true pose). Encoder: the
default model (real DINOv2 ViT-S/14 with seeded FoL heads) on the CPU, fp32 tokens exactly as the encoder returns
them. The cache file (npz, no pickle) is keyed by the model fingerprint under $FOL_ROS_CACHE/bench_tokens.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from dataclasses import dataclass

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = pathlib.Path(os.environ.get('FOL_ROS_SHARED_DATA', REPO.parent / 'shared' / 'data'))


@dataclass
class Encoded:
    """Encodings of one traversal, ragged tokens concatenated."""

    globals: np.ndarray     # float32 [N, D]
    local: np.ndarray       # float32 [sum L, d]
    index: np.ndarray       # int32 [sum L]
    xy: np.ndarray          # float32 [sum L, 2]
    offsets: np.ndarray     # int64 [N + 1]
    grids: np.ndarray       # int64 [N, 2]
    sizes: np.ndarray       # int64 [N, 2]
    stamps: np.ndarray      # int64 [N]
    positions: np.ndarray   # float64 [N, 3] (nan without poses)

    def __len__(self) -> int:
        return len(self.globals)

    def tokens(self, i: int) -> np.ndarray:
        return self.local[self.offsets[i]:self.offsets[i + 1]]

    def encoding(self, i: int):
        from fol_ros.records import Encoding
        a, b = self.offsets[i], self.offsets[i + 1]
        return Encoding(self.globals[i], self.local[a:b], self.index[a:b], self.xy[a:b],
                        tuple(map(int, self.grids[i])), tuple(map(int, self.sizes[i])))


@dataclass
class TokenSet:
    name: str
    fingerprint: str
    ref: Encoded
    query: Encoded
    positives: list[set[int]]   # per query: map rows that are correct


def _encoder():
    from fol_ros.config import EngineConfig, ModelConfig
    from fol_ros.encode.base import create_encoder
    return create_encoder(ModelConfig(), EngineConfig(engine='auto', device='cpu'))


def _encode(encoder, images, stamps, positions, batch=4) -> Encoded:
    encs = []
    for i in range(0, len(images), batch):
        encs += encoder.encode(images[i:i + batch], color='rgb')
        print(f'  encoded {len(encs)}/{len(images)}', file=sys.stderr, flush=True)
    counts = [len(e.local) for e in encs]
    return Encoded(np.stack([np.asarray(e.global_desc, np.float32) for e in encs]),
                   np.concatenate([np.asarray(e.local, np.float32) for e in encs]),
                   np.concatenate([np.asarray(e.local_index, np.int32) for e in encs]),
                   np.concatenate([np.asarray(e.local_xy, np.float32) for e in encs]),
                   np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                   np.array([e.grid for e in encs], np.int64), np.array([e.image_size for e in encs], np.int64),
                   np.asarray(stamps, np.int64), np.asarray(positions, np.float64))


def _corridor(encoder):
    import cv2
    root = SHARED / 'corridor'
    refs, queries = sorted((root / 'ref').glob('*.jpg')), sorted((root / 'query').glob('*.jpg'))
    if not refs or not queries:
        raise SystemExit(f'no Corridor images under {root} (set FOL_ROS_SHARED_DATA)')

    def read(p):
        return cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
    nan = np.full((1, 3), np.nan)
    ref = _encode(encoder, [read(p) for p in refs], np.arange(len(refs)) * 10**9, nan.repeat(len(refs), 0))
    query = _encode(encoder, [read(p) for p in queries], (3600 + np.arange(len(queries))) * 10**9,
                    nan.repeat(len(queries), 0))
    return ref, query


def _demo(encoder):
    from fol_ros.demo.sequence import RouteConfig, load_strip, traversal
    config = RouteConfig()
    strip = load_strip(config)
    out = []
    for revisit in (False, True):
        frames = traversal(strip, config, revisit)
        out.append(_encode(encoder, [f.image_rgb for f in frames], [f.stamp_ns for f in frames],
                           [f.pose.position for f in frames]))
    return tuple(out)


def _positives(name: str, ref: Encoded, query: Encoded) -> list[set[int]]:
    if name == 'corridor':
        gt = np.load(SHARED / 'corridor' / 'ground_truth_new.npy', allow_pickle=True)   # the data set's own format
        table = {int(row[0]): {int(v) for v in np.atleast_1d(row[1])} for row in gt}
        return [table.get(i, set()) for i in range(len(query))]
    d = np.linalg.norm(query.positions[:, None, :] - ref.positions[None, :, :], axis=-1)
    return [set(np.nonzero(row <= 3.0)[0].tolist()) for row in d]


def cache_dir() -> pathlib.Path:
    root = pathlib.Path(os.environ.get('FOL_ROS_CACHE', pathlib.Path.home() / '.cache' / 'fol_ros'))
    return root / 'bench_tokens'


def load(name: str, encoder=None) -> TokenSet:
    """The encodings of set `name` ('corridor' or 'demo'), from the cache or encoded now (minutes on a CPU)."""
    from fol_ros.model.weights import ensure_default_checkpoint  # noqa: F401  (the default model must exist)
    encoder = encoder or _encoder()
    fp = encoder.info.fingerprint
    path = cache_dir() / f'{name}-{fp}.npz'
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            parts = {k: z[k] for k in z.files}
        ref = Encoded(**{k[4:]: v for k, v in parts.items() if k.startswith('ref_')})
        query = Encoded(**{k[6:]: v for k, v in parts.items() if k.startswith('query_')})
    else:
        t0 = time.perf_counter()
        print(f'encoding {name} with {fp} (cached afterwards in {path})', file=sys.stderr, flush=True)
        ref, query = _corridor(encoder) if name == 'corridor' else _demo(encoder)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix('.tmp.npz')
        np.savez(tmp, **{f'ref_{k}': v for k, v in vars(ref).items()},
                 **{f'query_{k}': v for k, v in vars(query).items()})
        os.replace(tmp, path)
        print(f'encoded {name} in {time.perf_counter() - t0:.0f} s', file=sys.stderr, flush=True)
    return TokenSet(name, fp, ref, query, _positives(name, ref, query))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sets', nargs='+', default=['corridor', 'demo'])
    args = p.parse_args()
    encoder = _encoder()
    for name in args.sets:
        s = load(name, encoder)
        lens = np.diff(s.ref.offsets)
        print(f'{name}: {len(s.ref)} map places (mean {lens.mean():.0f} tokens), {len(s.query)} queries, '
              f'{sum(bool(p) for p in s.positives)} with a positive')


if __name__ == '__main__':
    main()

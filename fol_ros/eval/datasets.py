"""Benchmark dataset folders and their ground truth (fol-method §11).

Two layouts are recognised:
* VPR-methods-evaluation / VPR-datasets-downloader: `database/` and `queries/` (also nested as
  `<name>/images/test/{database,queries}`); the UTM easting/northing is in every file name
  (`@utm_e@utm_n@...`), and a query's positives are the database images within 25 m (inclusive).
* VPR-Bench: `ref/`, `query/` and `ground_truth_new.npy` with rows `[query_index, [ref indices]]`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fol_ros.errors import BadInputError
from fol_ros.sources import IMAGE_SUFFIXES, read_image

log = logging.getLogger(__name__)

DEFAULT_RADIUS_M = 25.0


@dataclass
class VprDataset:
    """Database and query images of a benchmark with, per query, the database indices that count as correct.

    Indices are positions in `database_paths` (database first, then queries, as in fol-method §9.1).
    """

    name: str
    layout: str
    database_paths: list[Path]
    query_paths: list[Path]
    positives: list[np.ndarray]
    database_utm: np.ndarray | None = None
    query_utm: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.positives) != len(self.query_paths):
            raise BadInputError(f'{self.name}: {len(self.query_paths)} queries but ground truth for '
                                f'{len(self.positives)}')


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted by path so indices are reproducible."""
    files = sorted(p for p in folder.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BadInputError(f'no images ({", ".join(IMAGE_SUFFIXES)}) under {folder}')
    return files


def utm_from_name(path: Path) -> tuple[float, float]:
    """(easting, northing) from a VPR-datasets-downloader file name `@utm_e@utm_n@...`."""
    parts = path.name.split('@')
    try:
        return float(parts[1]), float(parts[2])
    except (IndexError, ValueError):
        raise BadInputError(f'{path}: the file name carries no UTM coordinates; VPR-methods-evaluation layouts '
                            'name images "@<utm_east>@<utm_north>@...". Use a VPR-Bench layout with '
                            'ground_truth_new.npy for other data') from None


def positives_within(database_xy: np.ndarray, query_xy: np.ndarray, radius_m: float) -> list[np.ndarray]:
    """Per query, the sorted database indices within `radius_m` (distance <= radius, as the paper's sklearn call)."""
    from sklearn.neighbors import NearestNeighbors

    if len(database_xy) == 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(len(query_xy))]
    knn = NearestNeighbors(n_jobs=1).fit(np.asarray(database_xy, dtype=np.float64))
    found = knn.radius_neighbors(np.asarray(query_xy, dtype=np.float64), radius=radius_m, return_distance=False)
    return [np.sort(np.asarray(f, dtype=np.int64)) for f in found]


def _vpr_methods(root: Path, db: Path, queries: Path, radius_m: float) -> VprDataset:
    db_paths, q_paths = list_images(db), list_images(queries)
    db_utm = np.array([utm_from_name(p) for p in db_paths], dtype=np.float64)
    q_utm = np.array([utm_from_name(p) for p in q_paths], dtype=np.float64)
    return VprDataset(name=root.name, layout='vpr-methods-evaluation', database_paths=db_paths, query_paths=q_paths,
                      positives=positives_within(db_utm, q_utm, radius_m), database_utm=db_utm, query_utm=q_utm,
                      extra={'radius_m': radius_m, 'queries_folder': queries.name})


def _vpr_bench(root: Path) -> VprDataset:
    db_paths, q_paths = list_images(root / 'ref'), list_images(root / 'query')
    # ground_truth_new.npy is a pickled object array: that is VPR-Bench's own file format, and a numpy object
    # array cannot be read any other way. Only open benchmark folders you trust.
    table = np.load(root / 'ground_truth_new.npy', allow_pickle=True)
    positives = [np.zeros(0, dtype=np.int64) for _ in q_paths]
    for row in table:
        q = int(row[0])
        if not 0 <= q < len(q_paths):
            raise BadInputError(f'{root}/ground_truth_new.npy names query {q} but query/ has {len(q_paths)} images')
        refs = np.atleast_1d(np.asarray(row[1], dtype=np.int64))
        if refs.size and (refs.min() < 0 or refs.max() >= len(db_paths)):
            raise BadInputError(f'{root}/ground_truth_new.npy: query {q} names ref index {int(refs.max())} '
                                f'outside 0..{len(db_paths) - 1}')
        positives[q] = np.unique(refs)
    return VprDataset(name=root.name, layout='vpr-bench', database_paths=db_paths, query_paths=q_paths,
                      positives=positives)


def load_dataset(root: str | Path, *, queries: str = '', radius_m: float = DEFAULT_RADIUS_M) -> VprDataset:
    """Open a benchmark folder in either layout (detected from its contents).

    Args:
        root: the dataset folder, e.g. `pitts30k/images/test`, `pitts30k`, or a VPR-Bench `corridor`.
        queries: queries folder name for VPR-methods layouts with several (`queries_v1`, `queries_night`, ...);
            '' = `queries`.
        radius_m: positive radius for UTM layouts (the paper uses 25 m).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise BadInputError(f'dataset folder {root} does not exist')
    if (root / 'ground_truth_new.npy').is_file() and (root / 'ref').is_dir() and (root / 'query').is_dir():
        return _vpr_bench(root)
    for base in (root, root / 'images' / 'test', root / 'test'):
        db = next((base / n for n in ('database', 'gallery') if (base / n).is_dir()), None)
        q = base / (queries or 'queries')
        if db is not None and q.is_dir():
            ds = _vpr_methods(root, db, q, radius_m)
            log.info('%s: %d database / %d queries (%s layout, %s)', ds.name, len(ds.database_paths),
                     len(ds.query_paths), ds.layout, base)
            return ds
    raise BadInputError(f'{root}: not a known dataset layout. Expected database/ + {queries or "queries"}/ '
                        '(optionally under images/test/), or ref/ + query/ + ground_truth_new.npy (VPR-Bench)')


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image file to RGB uint8 (H, W, 3); the same reader map building uses."""
    return read_image(path)

"""The places table of a map: one row per place, stored as a plain CSV (readable, diffable, no pickle)."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from fol_ros.errors import MapError
from fol_ros.records import Pose
from fol_ros.search.storage import read_capped

_I64 = (1 << 63) - 1
COLUMNS = ('place_id', 'stamp_ns', 'frame_id', 'pose_frame', 'x', 'y', 'z', 'qx', 'qy', 'qz', 'qw',
           'grid_h', 'grid_w', 'image_h', 'image_w', 'num_tokens', 'source')


@dataclass(frozen=True)
class Place:
    """One map place.

    Attributes:
        place_id: unique id, never reused after removal.
        stamp_ns: capture time of the source image (ns since the epoch or bag start).
        frame_id: the source image's frame id (camera frame), '' if unknown.
        pose: camera pose in the map frame (`pose.frame_id` names that frame), None when no pose was available.
        source: optional reference to the source image (file name, or 'bag:topic#index').
        grid: (H', W') local grid of the encoding; image_size: (H, W) of the source image.
        num_tokens: number of local tokens stored for the place.
    """

    place_id: int
    stamp_ns: int
    frame_id: str
    pose: Pose | None
    source: str
    grid: tuple[int, int]
    image_size: tuple[int, int]
    num_tokens: int

    def to_json(self) -> dict:
        row = dict(zip(COLUMNS, _row(self)))
        return row

    @staticmethod
    def from_json(row: dict, where: str = 'log record') -> 'Place':
        """Parse a place written by `to_json` (MapError naming the problem when a field is missing or bad)."""
        if not isinstance(row, dict) or not all(isinstance(row.get(c), str) for c in COLUMNS):
            missing = [c for c in COLUMNS if not isinstance(row, dict) or not isinstance(row.get(c), str)]
            raise MapError(f'{where}: place field {missing[0]!r} is missing or not a string')
        return _parse([row[c] for c in COLUMNS], where)


def _fmt(v: float) -> str:
    return repr(float(v))


def _row(p: Place) -> list[str]:
    if p.pose is None:
        pose = [''] * 8
    else:
        pose = [p.pose.frame_id] + [_fmt(v) for v in (*p.pose.position, *p.pose.orientation)]
    return [str(p.place_id), str(p.stamp_ns), p.frame_id, *pose, str(p.grid[0]), str(p.grid[1]),
            str(p.image_size[0]), str(p.image_size[1]), str(p.num_tokens), p.source]


def _parse(row: list[str], where: str) -> Place:
    if len(row) != len(COLUMNS):
        raise MapError(f'{where}: expected {len(COLUMNS)} columns, found {len(row)}')
    try:
        pose = None
        if row[4] != '':
            vals = [float(v) for v in row[4:11]]
            if not all(math.isfinite(v) for v in vals):
                raise ValueError('non-finite pose')
            pose = Pose(tuple(vals[:3]), tuple(vals[3:]), row[3])
        place = Place(int(row[0]), int(row[1]), row[2], pose, row[16], (int(row[11]), int(row[12])),
                      (int(row[13]), int(row[14])), int(row[15]))
        for text in (row[2], row[3], row[16]):
            text.encode('utf-8')   # lone surrogates cannot be written back or logged
    except (ValueError, UnicodeError) as exc:
        raise MapError(f'{where}: bad value in row {ascii(row[:2])}: {ascii(str(exc))}') from None
    for name, value, lo, hi in (('place_id', place.place_id, 0, _I64), ('stamp_ns', place.stamp_ns, -_I64 - 1, _I64),
                                ('grid_h', place.grid[0], 0, 1 << 16), ('grid_w', place.grid[1], 0, 1 << 16),
                                ('image_h', place.image_size[0], 0, 1 << 20),
                                ('image_w', place.image_size[1], 0, 1 << 20),
                                ('num_tokens', place.num_tokens, 0, 1 << 24)):
        if not lo <= value <= hi:
            raise MapError(f'{where}: {name} {value} is out of range {lo}..{hi}')
    return place


def write_places(path: Path, places: list[Place]) -> None:
    """Write the table (header + one row per place) as UTF-8 CSV."""
    with open(path, 'w', newline='', encoding='utf-8') as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for place in places:
            writer.writerow(_row(place))
        handle.flush()


def read_places(path: Path, cap: int = 1 << 34) -> list[Place]:
    """Read a table written by `write_places` (a regular file of at most `cap` bytes); raises MapError on a wrong
    header, bad UTF-8 or a bad row."""
    try:
        text = read_capped(Path(path), cap).decode('utf-8')
        reader = csv.reader(io.StringIO(text, newline=''))
        header = next(reader, None)
        if tuple(header or ()) != COLUMNS:
            raise MapError(f'{path}: unexpected header {ascii(header)[:200]}; not a fol_ros places table')
        return [_parse(row, f'{path}:{i + 2}') for i, row in enumerate(reader)]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MapError(f'{path} is not a readable places table ({exc}); the map is damaged') from None

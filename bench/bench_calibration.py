"""Gate calibration vs the fixed thresholds: precision and recall of the accepted loop closures.

    .venv/bin/python bench/bench_calibration.py [--sets demo corridor gardens] [--models default heads-seed-1]

For each data set the reference traversal becomes a map, `fol_ros.verify.calibration.calibrate` estimates its gate
thresholds for a target precision of 0.99, and the query traversal is streamed frame by frame through the node's
`Localizer` twice: with the fixed defaults (gate.thresholds: fixed) and with the calibration (auto). An accepted
closure is correct when its place is a true match (demo: within 3 m of the ground-truth pose; Corridor: the data
set's ground truth). Two models show that the thresholds move with the weights: the default (real DINOv2 ViT-S/14
with seeded FoL heads) and the same backbone with heads from another seed. Prints a table, writes
bench/results/calibration.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / 'shared' / 'data'
S = 10**9


def _encoder(model: str, tmp: pathlib.Path):
    from fol_ros.config import EngineConfig, ModelConfig
    from fol_ros.encode.base import create_encoder
    checkpoint = ''
    if model == 'heads-seed-1':   # same backbone, other FoL head weights
        import torch
        from fol_ros.model.checkpoint import save_checkpoint, seeded_head_state
        from fol_ros.model.fol import FoLNet
        from fol_ros.model.weights import ensure_default_checkpoint
        state = torch.load(ensure_default_checkpoint(), weights_only=True)['model_state_dict']
        net = FoLNet('vits14')
        sd = {k.removeprefix('module.'): v for k, v in state.items()}
        sd.update(seeded_head_state(384, seed=1))
        net.load_state_dict(sd, strict=True)
        checkpoint = str(save_checkpoint(net, tmp / 'heads_seed_1.pth', label='ViT-S/14 + FoL heads seed 1'))
    return create_encoder(ModelConfig(checkpoint=checkpoint), EngineConfig(engine='auto', device='cpu'))


def _demo():
    from fol_ros.demo.sequence import RouteConfig, load_strip, traversal
    config = RouteConfig()
    strip = load_strip(config)
    ref, query = traversal(strip, config, False), traversal(strip, config, True)
    ref_items = [(f.image_rgb, f.stamp_ns, f.pose) for f in ref]
    query_items = [(f.image_rgb, f.stamp_ns, f.pose) for f in query]

    def truth(i: int, place) -> bool:
        return float(np.linalg.norm(np.subtract(place.pose.position, query[i].pose.position))) <= 3.0

    return ref_items, query_items, truth


def _folder_set(name: str):
    import cv2
    root = SHARED / name

    def read(p):
        return cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)

    key = (lambda p: int(p.stem)) if name == 'gardens_point_10' else (lambda p: p.name)
    refs = sorted((root / 'ref').glob('*.jpg'), key=key)
    queries = sorted((root / 'query').glob('*.jpg'), key=key)
    if name == 'corridor':
        gt = np.load(root / 'ground_truth_new.npy', allow_pickle=True)
        positives = {int(row[0]): {int(v) for v in np.atleast_1d(row[1])} for row in gt}
    else:   # consecutive frames: +-1 is fair (SOURCE.md)
        positives = {i: {i - 1, i, i + 1} for i in range(len(queries))}
    # a sequence: 1 s apart; the queries come an hour later (no exclusion by time against the map)
    ref_items = [(read(p), i * S, None) for i, p in enumerate(refs)]
    query_items = [(read(p), (3600 + i) * S, None) for i, p in enumerate(queries)]

    def truth(i: int, place) -> bool:
        return place.place_id in positives.get(i, set())

    return ref_items, query_items, truth


def _map(encoder, items):
    from fol_ros.search.place_map import PlaceMap
    pmap = PlaceMap.create(encoder.info)
    for (rgb, stamp, pose), enc in zip(items, _encode(encoder, [i[0] for i in items])):
        pmap.add(enc, stamp, pose)
    return pmap


def _encode(encoder, images, batch=4):
    out = []
    for i in range(0, len(images), batch):
        out += encoder.encode(images[i:i + batch], color='rgb')
    return out


def _stream(config, encoder, pmap, encodings, items, truth) -> dict:
    from fol_ros.pipeline import Localizer, Status
    loc = Localizer(config, encoder, pmap)
    accepted = correct = answerable = 0
    for i, (enc, (_, stamp, pose)) in enumerate(zip(encodings, items)):
        result = loc.process_encoding(enc, stamp, pose)
        answerable += any(truth(i, p) for p in pmap.places)
        d = result.loop_closure
        if result.status == Status.OK and d is not None and d.accepted:
            accepted += 1
            correct += truth(i, pmap.place(d.candidate.place_id))
    g = loc.config.gate
    return {'thresholds': {'min_global_similarity': g.min_global_similarity, 'min_local_matches': g.min_local_matches},
            'accepted': accepted, 'correct': correct, 'precision': correct / accepted if accepted else None,
            'recall': correct / answerable if answerable else None, 'note': loc.gate_note}


def run(sets, models) -> dict:
    from fol_ros.config import GateConfig, PipelineConfig
    from fol_ros.errors import ConfigError
    from fol_ros.verify.calibration import CalibrationOptions, calibrate
    base = PipelineConfig()   # the shipped node settings
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            encoder = _encoder(model, pathlib.Path(tmp))
            for name in sets:
                ref, query, truth = _demo() if name == 'demo' else _folder_set(name)
                t0 = time.perf_counter()
                pmap = _map(encoder, ref)
                encodings = _encode(encoder, [q[0] for q in query])
                row = {'set': name, 'model': model, 'places': len(pmap), 'queries': len(query),
                       'encode_s': round(time.perf_counter() - t0, 1)}
                t0 = time.perf_counter()
                try:
                    c = calibrate(pmap, base, CalibrationOptions(target_precision=0.99))
                    pmap.calibration = c
                    row['calibration'] = {k: v for k, v in c.to_json().items() if k not in ('settings',)}
                except ConfigError as exc:
                    row['calibration'] = {'error': str(exc)}
                row['calibrate_s'] = round(time.perf_counter() - t0, 1)
                fixed = dataclasses.replace(base, gate=dataclasses.replace(base.gate, thresholds='fixed'))
                row['fixed'] = _stream(fixed, encoder, pmap, encodings, query, truth)
                if pmap.calibration is not None:
                    row['calibrated'] = _stream(base, encoder, pmap, encodings, query, truth)
                results.append(row)
                _print_row(row)
    return {'bench': 'calibration', 'target_precision': 0.99, 'results': results,
            'settings': {'search.top_k': base.search.top_k, 'rerank.top_k': base.rerank.top_k,
                         'verify.method': base.verify.method, 'gate': dataclasses.asdict(GateConfig())}}


def _fmt(x):
    return '-' if x is None else f'{x:.3f}'


def _print_row(row: dict) -> None:
    for kind in ('fixed', 'calibrated'):
        r = row.get(kind)
        if r is None:
            print(f"{row['set']:>9} {row['model']:>13} {kind:>10}  {row['calibration'].get('error', '')[:90]}")
            continue
        t = r['thresholds']
        print(f"{row['set']:>9} {row['model']:>13} {kind:>10}  G {t['min_global_similarity']:7.4f}  "
              f"M {t['min_local_matches']:4d}  accepted {r['accepted']:4d}  correct {r['correct']:4d}  "
              f"precision {_fmt(r['precision'])}  recall {_fmt(r['recall'])}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sets', nargs='+', default=['demo', 'corridor', 'gardens_point_10'])
    p.add_argument('--models', nargs='+', default=['default', 'heads-seed-1'])
    p.add_argument('--out', default=str(REPO / 'bench' / 'results' / 'calibration.json'))
    args = p.parse_args()
    print(f"{'set':>9} {'model':>13} {'gate':>10}")
    result = run(args.sets, args.models)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()

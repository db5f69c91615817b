"""The training loop (fol-method §10): AdamW + per-iteration LinearLR, AMP on CUDA, the FoL objective, recall
validation every epoch, checkpoints in the official layout and resume.

`train(cfg)` is the whole run; `fol-ros train --config FILE` only parses the YAML and calls it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fol_ros.errors import CheckpointError, ConfigError
from fol_ros.train import data as D
from fol_ros.train.config import TrainConfig, expand_path
from fol_ros.train.frozen import FrozenCache, trainable_parameters
from fol_ros.train.losses import FoLObjective

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run produced: per-step total losses, per-epoch validation recalls, checkpoint paths."""

    losses: list[float] = field(default_factory=list)
    parts: list[dict[str, float]] = field(default_factory=list)
    recalls: list[dict] = field(default_factory=list)   # index 0 = before training (epoch 0)
    checkpoints: list[str] = field(default_factory=list)
    best: str = ''
    steps: int = 0
    wall_s: float = 0.0


def build_places(cfg: TrainConfig) -> list[D.Place]:
    """All places of every configured source, relabelled so labels are unique across sources."""
    places: list[D.Place] = []
    for src in cfg.data.sources:
        root = expand_path(src.root)
        if src.type == 'places':
            found = D.folder_places(root, src.min_images)
        elif src.type == 'views':
            found = D.folder_places(root, src.min_images)
            if any(len(p.images) > 1 for p in found):
                log.info('views source %s has sub-folders with several images: using them as places', root)
        elif src.type == 'gsv_cities':
            found = D.gsv_cities_places(root, src.cities, max(src.min_images, 1), cfg.data.k,
                                        cfg.data.random_sample, cfg.seed)
        else:
            found = D.rosbag_places(root, src.image_topic, src.pose_topic, src.cell_m, max(src.min_images, 2))
        log.info('source %s %s: %d places', src.type, root, len(found))
        places += [D.Place(len(places) + i, p.images, p.name) for i, p in enumerate(found)]
    return places


def build_model(cfg: TrainConfig):
    """The network to fine-tune: a checkpoint, the default ViT-S/14 weights, or a seeded fresh tiny net."""
    from fol_ros.model.checkpoint import load_checkpoint
    from fol_ros.model.fol import FoLNet

    if cfg.checkpoint:
        net, _ = load_checkpoint(expand_path(cfg.checkpoint), backbone=cfg.backbone)
    elif cfg.backbone == 'vits14':
        from fol_ros.model.weights import ensure_default_checkpoint
        net, _ = load_checkpoint(ensure_default_checkpoint(), backbone='vits14')
    elif cfg.backbone == 'tiny':
        torch.manual_seed(cfg.seed)
        net = FoLNet('tiny')
    else:
        raise ConfigError(f'backbone {cfg.backbone} has no weights here: give checkpoint: <FoL_base/large.pth>')
    return net


def _device(name: str) -> torch.device:
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(name)


def save_training_checkpoint(path: Path, net, optimizer, scheduler, scaler, epoch: int, step: int,
                             recalls: dict, best: float, not_improved: int, cfg: TrainConfig) -> Path:
    """Official layout ({'model_state_dict': {'module.' + key}}, epoch_num, optimizer_state_dict, recalls,
    best_r5, not_improved_num) plus scheduler/scaler/step so that resume continues exactly."""
    from fol_ros.model.checkpoint import META_KEY

    obj = {'epoch_num': epoch, 'model_state_dict': {'module.' + k: v.detach().cpu()
                                                     for k, v in net.state_dict().items()},
           'optimizer_state_dict': optimizer.state_dict(), 'scheduler_state_dict': scheduler.state_dict(),
           'scaler_state_dict': scaler.state_dict() if scaler is not None else {},
           'recalls': recalls, 'best_r5': best, 'not_improved_num': not_improved, 'step': step,
           META_KEY: {'label': f'fol-ros train {cfg.backbone} epoch {epoch}'}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.tmp')
    torch.save(obj, tmp)
    tmp.replace(path)
    return path


def _resume(path: str, net, optimizer, scheduler, scaler) -> tuple[int, int, float, int]:
    try:
        obj = torch.load(expand_path(path), map_location='cpu', weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types
        raise CheckpointError(f'cannot resume from {path}: {str(exc).splitlines()[0][:200]}') from None
    if 'optimizer_state_dict' not in obj:
        raise CheckpointError(f'{path} has no optimizer state; resume needs a checkpoint written by fol-ros train '
                              '(to fine-tune from plain weights, set checkpoint: instead)')
    sd = {(k[7:] if k.startswith('module.') else k): v for k, v in obj['model_state_dict'].items()}
    net.load_state_dict(sd, strict=True)
    optimizer.load_state_dict(obj['optimizer_state_dict'])
    scheduler.load_state_dict(obj['scheduler_state_dict'])
    if scaler is not None and obj.get('scaler_state_dict'):
        scaler.load_state_dict(obj['scaler_state_dict'])
    log.info('resumed from %s at epoch %d (step %d)', path, obj['epoch_num'], obj.get('step', 0))
    return int(obj['epoch_num']), int(obj.get('step', 0)), float(obj.get('best_r5', -1.0)), \
        int(obj.get('not_improved_num', 0))


def _validate(cfg: TrainConfig, net, device: torch.device, cache: FrozenCache | None = None) -> dict:
    if not cfg.validation.dataset:
        return {}
    from fol_ros.train.validate import evaluate_folder
    v = cfg.validation
    t0 = time.perf_counter()
    rec = evaluate_folder(net, expand_path(v.dataset), cfg.input_size, rerank_k=v.rerank_k,
                          recall_values=v.recall_values, batch_size=v.batch_size, device=str(device),
                          cache=cache)
    log.info('validation %s: global %s | re-ranked (top %d) %s (%.0f s)', Path(v.dataset).name,
             rec['global'], v.rerank_k, rec['rerank'], time.perf_counter() - t0)
    return rec


def _selection(cfg: TrainConfig, rec: dict) -> float:
    if not rec:
        return -1.0
    kind, _, k = cfg.validation.select_by.partition('@')
    return float(rec[kind].get(k, -1.0))


def _batches(n_places: int, cfg: TrainConfig, epoch: int) -> list[list[int]]:
    order = list(range(n_places))
    if cfg.data.shuffle:
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
    p = cfg.data.places_per_batch
    chunks = [order[i:i + p] for i in range(0, n_places, p)]
    chunks = [c for c in chunks if len(c) >= 2]   # a lone place has no negatives
    steps = cfg.optim.steps_per_epoch
    while steps and len(chunks) < steps:          # several passes when an epoch is longer than the data
        chunks += _batches(n_places, dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim,
                                                                                        steps_per_epoch=0)),
                           epoch * 7919 + len(chunks))
    return chunks[:steps] if steps else chunks


def train(cfg: TrainConfig) -> TrainResult:
    """Run the configured training; returns the loss history, recalls and checkpoint paths."""
    from tqdm import tqdm

    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = _device(cfg.device)
    out_dir = Path(expand_path(cfg.output_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'config.json').write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))

    places = build_places(cfg)
    dataset = D.PlacesDataset(places, cfg.data.k, cfg.input_size, cfg.data.transform, cfg.data.random_sample,
                              view_strength=cfg.data.view_strength, epoch_views=cfg.data.epoch_views, seed=cfg.seed)
    net = build_model(cfg).to(device)
    params = trainable_parameters(net, cfg.freeze)
    log.info('%d places x %d images; %s; %d trainable tensors (%.2f M parameters), freeze=%s, device %s',
             len(dataset), cfg.data.k, cfg.backbone, len(params), sum(p.numel() for p in params) / 1e6,
             cfg.freeze, device)
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=cfg.optim.lr_end_factor,
                                                  total_iters=cfg.optim.lr_total_iters)
    use_amp = cfg.optim.amp and device.type == 'cuda'
    scaler = torch.amp.GradScaler('cuda') if use_amp else None
    objective = FoLObjective(cfg.loss, seed=cfg.seed)
    result = TrainResult()
    start_epoch, step, best, not_improved = 0, 0, -1.0, 0
    cache = FrozenCache(net, cfg.freeze, device) if cfg.cache_frozen else None
    if cfg.resume:
        start_epoch, step, best, not_improved = _resume(cfg.resume, net, optimizer, scheduler, scaler)
    else:
        result.recalls.append({'epoch': 0, **_validate(cfg, net, device, cache)})

    for epoch in range(start_epoch + 1, cfg.optim.epochs + 1):
        dataset.set_epoch(epoch)
        net.train()
        chunks = _batches(len(dataset), cfg, epoch)
        bar = tqdm(chunks, desc=f'epoch {epoch}/{cfg.optim.epochs}', disable=not cfg.progress, leave=False)
        for chunk in bar:
            if cache is not None:
                payload, labels = cache.batch(dataset, chunk)
                images, ctx = cache.placeholder(len(labels)), cache.staged(payload)
            else:
                images, labels = D.collate_places([dataset[i] for i in chunk])
                images, ctx = images.to(device), contextlib.nullcontext()
            labels = labels.to(device)
            with ctx, torch.autocast('cuda', dtype=torch.float16, enabled=use_amp):
                out = net.forward_train(images)
                loss, parts = objective(out, labels)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            step += 1
            result.losses.append(float(loss.detach()))
            result.parts.append(parts)
            bar.set_postfix(loss=f'{result.losses[-1]:.4f}', lr=f'{scheduler.get_last_lr()[0]:.2e}')
            if step % cfg.log_every == 0:
                log.info('epoch %d step %d loss %.4f %s lr %.2e', epoch, step, result.losses[-1],
                         ' '.join(f'{k}={v:.4f}' for k, v in parts.items()), scheduler.get_last_lr()[0])
        rec = _validate(cfg, net, device, cache)
        result.recalls.append({'epoch': epoch, **rec})
        score = _selection(cfg, rec)
        improved = score > best
        best, not_improved = (score, 0) if improved else (best, not_improved + 1)
        path = save_training_checkpoint(out_dir / f'epoch_{epoch:02d}.pth', net, optimizer, scheduler, scaler,
                                        epoch, step, rec, best, not_improved, cfg)
        result.checkpoints.append(str(path))
        if improved or not rec:
            from fol_ros.model.checkpoint import save_checkpoint
            result.best = str(save_checkpoint(net, out_dir / 'best_model.pth',
                                              label=f'fol-ros train {cfg.backbone} epoch {epoch}'))
        if not_improved >= cfg.optim.patience:
            log.info('no improvement for %d epochs: stopping', not_improved)
            break
    result.steps, result.wall_s = step, time.perf_counter() - t_start
    (out_dir / 'history.json').write_text(json.dumps(dataclasses.asdict(result), indent=1))
    log.info('done: %d steps in %.0f s; best weights %s', step, result.wall_s, result.best)
    return result

"""What configure acquires (model and map, as a Localizer) and the bridge of the core's logs to rclpy."""
from __future__ import annotations

import logging
import os

from fol_ros.pipeline import Localizer
from fol_ros.config import NodeSettings


def load_localizer(settings: NodeSettings, config, logger) -> Localizer:
    """The encoder and the map the settings ask for (raises FolError subclasses with actionable messages)."""
    from fol_ros.encode.base import create_encoder
    from fol_ros.errors import MapError
    from fol_ros.search.backends import check_reachable
    from fol_ros.search.place_map import PlaceMap
    check_reachable(config.search)   # search.backend milvus: an unreachable database fails before the model loads
    encoder = create_encoder(config.model, config.engine)
    place_map = None
    if settings.map_path and os.path.exists(settings.map_path):
        place_map = PlaceMap.load(settings.map_path, expect=encoder.info)
    elif settings.mode == 'localization':
        raise MapError(f'map {settings.map_path!r} does not exist: build it with `fol-ros map build` '
                       'or set mode mapping')
    else:
        logger.info(f'mapping mode: no map at {settings.map_path!r} yet, starting an empty one')
    localizer = Localizer(config, encoder, place_map, mapping=settings.mode == 'mapping')
    logger.info(f'warm-up frame through every stage: {localizer.warm_up():.0f} ms')
    return localizer


def map_id(localizer: Localizer, map_path: str) -> str:
    """'<model fingerprint[:8]>/<map folder name>' ('' without a map)."""
    if localizer.place_map is None:
        return ''
    name = os.path.basename(os.path.normpath(map_path)) if map_path else 'session'
    return f'{localizer.encoder.info.fingerprint[:8]}/{name}'


class RclpyLogHandler(logging.Handler):
    """Forwards the core's stdlib log records to an rclpy logger (one logging owner per process)."""

    def __init__(self, logger) -> None:
        super().__init__()
        self.logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        text = f'{record.name}: {record.getMessage()}'
        if record.levelno >= logging.ERROR:
            self.logger.error(text)
        elif record.levelno >= logging.WARNING:
            self.logger.warning(text)
        elif record.levelno >= logging.INFO:
            self.logger.info(text)
        else:
            self.logger.debug(text)

"""Where the global descriptors are searched: faiss in this process (default) or a shared vector database.

`open_backend(config.search, model, place_map) -> (index, place_map)` gives the Localizer its index and the map
view the pipeline reads places and tokens from. 'faiss' is `search.index.GlobalIndex` over the map, unchanged;
'milvus' is the fleet map (`milvus.MilvusIndex` + `milvus.FleetPlaceMap`, docs/fleet.md).
"""
from __future__ import annotations

from fol_ros.config import SearchConfig
from fol_ros.errors import ConfigError

BACKENDS = ('faiss', 'milvus')


def check_reachable(config: SearchConfig) -> None:
    """Before the model is loaded (seconds): a database server that does not answer fails at once, with its
    address and the reason (BackendError). Nothing to check for faiss or an embedded database."""
    if config.backend == 'milvus' and '://' in config.milvus_uri:
        from fol_ros.search.backends.milvus import probe_server
        probe_server(config.milvus_uri, float(config.connect_timeout_s))


def open_backend(config: SearchConfig, model, place_map):
    """(index, place map view) for search.backend; raises FolError subclasses naming the cause."""
    if config.backend == 'milvus':
        try:
            from fol_ros.search.backends.milvus import open_fleet
        except ImportError as exc:
            raise ConfigError(f'search.backend milvus needs pymilvus (pip install -r requirements.txt): {exc}') from exc
        return open_fleet(config, model, place_map)
    if config.backend != 'faiss':
        raise ConfigError(f'search.backend={config.backend!r} is not one of {", ".join(BACKENDS)}')
    from fol_ros.search.index import GlobalIndex
    if place_map is not None and len(place_map):   # loads the IVF/HNSW index map build saved, if it fits
        return GlobalIndex.for_map(place_map, config, write=False), place_map
    return GlobalIndex(config), place_map

"""Configuration: defaults (defaults.py) and loading with _BASE_ inheritance and validation
(loader.py).
"""

from retrieval.config.defaults import get_cfg
from retrieval.config.loader import ConfigError, cfg_from_dump, load_cfg, save_cfg

__all__ = ["ConfigError", "cfg_from_dump", "get_cfg", "load_cfg", "save_cfg"]

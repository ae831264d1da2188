"""skipgpt: per-token routers that let every token skip the attention and MLP modules it does not need."""

from .artifact import load_routers, save_routers
from .config import BaseModelInfo, SkipConfig
from .errors import ArtifactError, ConfigError, DataError, SkipGPTError, UnsupportedModelError
from .models.loading import load_model
from .models.routed import RoutedModel
from .routing.calibrate import calibrate_threshold

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "BaseModelInfo",
    "ConfigError",
    "DataError",
    "RoutedModel",
    "SkipConfig",
    "SkipGPTError",
    "UnsupportedModelError",
    "calibrate_threshold",
    "load_model",
    "load_routers",
    "save_routers",
]

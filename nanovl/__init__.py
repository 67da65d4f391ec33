"""nanovl: DeepSeek-VL from scratch in plain PyTorch. See README.md."""

from nanovl.config import PRESETS, VLConfig, get_config
from nanovl.model import DeepSeekVL, count_params

__all__ = ["PRESETS", "VLConfig", "get_config", "DeepSeekVL", "count_params"]

"""GQA/MQA conversion (Ainslie et al. 2023; Shazeer 2019)."""

from .config import GQAConfig
from .convert import CONFIG_RECORD_KEY, convert_to_gqa, register_gqa_method
from .pooling import mean_pool_kv_heads

__all__ = ["GQAConfig", "convert_to_gqa", "register_gqa_method", "mean_pool_kv_heads", "CONFIG_RECORD_KEY"]

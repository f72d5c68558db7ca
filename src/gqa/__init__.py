"""gqa: turn multi-head-attention language models into grouped-query (GQA) and multi-query (MQA) models."""

from .checkpoints import load, save
from .conversion import convert
from .errors import GQAError
from .generate import generate
from .model import ModelConfig, Transformer
from .version import __version__

__all__ = ["GQAError", "ModelConfig", "Transformer", "__version__", "convert", "generate", "load", "save"]

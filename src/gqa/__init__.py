"""gqa: turn multi-head-attention language models into grouped-query (GQA) and multi-query (MQA) models."""

__version__ = "0.1.0"

from .checkpoints import load, save
from .conversion import convert
from .errors import GQAError
from .generate import generate
from .model import ModelConfig, Transformer

__all__ = ["GQAError", "ModelConfig", "Transformer", "__version__", "convert", "generate", "load", "save"]

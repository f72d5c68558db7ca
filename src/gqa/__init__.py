"""gqa: turn multi-head-attention language models into grouped-query (GQA) and multi-query (MQA) models."""

__version__ = "0.1.0"

from .errors import GQAError  # noqa: E402
from .model import ModelConfig, Transformer  # noqa: E402
from .checkpoints import load, save  # noqa: E402
from .generate import generate  # noqa: E402

__all__ = ["GQAError", "ModelConfig", "Transformer", "load", "save", "generate", "__version__"]

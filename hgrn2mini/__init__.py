"""hgrn2mini: HGRN2 (gated linear RNN with state expansion, arXiv 2404.07904) in plain PyTorch,
with its recurrence as one `torch.library` op (`hgrn2mini::chunk_hgrn2`)."""

from hgrn2mini.checkpoint import CheckpointError
from hgrn2mini.config import HGRN2Config
from hgrn2mini.loss import linear_cross_entropy
from hgrn2mini.model import (
    CausalLMOutput,
    HGRN2ForCausalLM,
    HGRN2ForSequenceClassification,
    HGRN2Model,
    SequenceClassifierOutput,
)
from hgrn2mini.ops import chunk_hgrn2, gated_chunk_hgrn2

__all__ = [
    "CausalLMOutput",
    "CheckpointError",
    "HGRN2Config",
    "HGRN2ForCausalLM",
    "HGRN2ForSequenceClassification",
    "HGRN2Model",
    "SequenceClassifierOutput",
    "chunk_hgrn2",
    "gated_chunk_hgrn2",
    "linear_cross_entropy",
]
__version__ = "0.1.0"

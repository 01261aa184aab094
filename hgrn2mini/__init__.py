"""hgrn2mini: HGRN2 (gated linear RNN with state expansion, arXiv 2404.07904) in plain PyTorch,
with its recurrence as one `torch.library` op (`hgrn2mini::chunk_hgrn2`)."""

from hgrn2mini.checkpoint import CheckpointError
from hgrn2mini.model import CausalLMOutput, HGRN2Config, HGRN2ForCausalLM, HGRN2Model
from hgrn2mini.ops import chunk_hgrn2, gated_chunk_hgrn2

__all__ = [
    "CausalLMOutput",
    "CheckpointError",
    "HGRN2Config",
    "HGRN2ForCausalLM",
    "HGRN2Model",
    "chunk_hgrn2",
    "gated_chunk_hgrn2",
]
__version__ = "0.1.0"

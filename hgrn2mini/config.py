"""HGRN2's configuration: fla's `HGRN2Config` fields and defaults (config.json interchangeable
with fla's, which keeps it apart from the model too: fla/models/hgrn2/configuration_hgrn2.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from hgrn2mini.checks import check_config, check_config_dict

# Presets by name. Sizes of the published ones follow the paper / fla; the small ones are chosen
# for this library's own runs.
_PRESETS: dict[str, dict[str, Any]] = {
    # Trains on a 2-core CPU in minutes: ~2.1M parameters, H = 4 heads of K = V = 32, a vocabulary
    # small enough that the embedding and head do not dominate.
    "tiny": dict(vocab_size=4096, hidden_size=128, num_hidden_layers=4, expand_ratio=32),
    # GPT-2-small scale (~134M parameters) for single-GPU runs and benchmarks.
    "small": dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, expand_ratio=128),
    # The paper's 0.39B model (374M parameters with untied embeddings).
    "374M": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, expand_ratio=128),
    # fla's hgrn2-1.3B-100B.
    "1.3B": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=24, expand_ratio=128),
}


@dataclass
class HGRN2Config:
    """fla's `HGRN2Config` fields and defaults (config.json is interchangeable with fla's)."""

    vocab_size: int = 32000
    hidden_size: int = 2048  # D
    num_hidden_layers: int = 24  # L
    attn_mode: str = "chunk"  # kept for fla compatibility; one op serves every mode here
    num_heads: int | None = None  # H = D / expand_ratio when left None
    expand_ratio: int | None = 128  # K, the head key dim: the state is K x V per head
    use_short_conv: bool = False  # not implemented (fla's HGRN2 checkpoints do not use it)
    conv_size: int = 4
    use_lower_bound: bool = True
    hidden_ratio: int | None = 4
    intermediate_size: int | None = None  # 256 * ceil(int(D * hidden_ratio * 2/3) / 256) when None
    hidden_act: str = "swish"
    max_position_embeddings: int = 2048  # unused by a recurrent model; kept for fla compatibility
    elementwise_affine: bool = True  # g_norm has a weight
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int = 1
    eos_token_id: int = 2
    use_cache: bool = True
    # With labels, the loss without materializing the logits (`linear_cross_entropy`); the output's
    # logits are then None. fla's name and default; examples/train.py turns it on.
    fuse_linear_cross_entropy: bool = False
    # Not in fla (whose layers are causal only): the mixer also runs the recurrence reversed, with
    # the same parameters, and sums both directions (HGRN2Attention). For classifiers and encoders.
    bidirectional: bool = False
    num_labels: int = 2  # classes of HGRN2ForSequenceClassification (transformers' name)

    def __post_init__(self) -> None:
        check_config(self)  # fills num_heads / expand_ratio and intermediate_size as fla does

    @property
    def head_k_dim(self) -> int:  # K
        return self.expand_ratio

    @property
    def head_v_dim(self) -> int:  # V
        return self.hidden_size // self.num_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> HGRN2Config:
        if name not in _PRESETS:
            raise ValueError(f"preset name must be one of {sorted(_PRESETS)}, got {name!r}")
        return cls(**{**_PRESETS[name], **overrides})

    def to_dict(self, architecture: str = "HGRN2ForCausalLM") -> dict[str, Any]:
        """fla's config.json keys, plus the two that identify the model to fla and transformers."""
        return {"model_type": "hgrn2", "architectures": [architecture], **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HGRN2Config:
        """Reads fla's config.json; keys that only steer fla's fused kernels (fuse_norm, ...) are ignored."""
        check_config_dict(d)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

"""Named model shapes that can be built with random weights, offline.

No hub downloads exist on the machines this project is developed and tested on, so the engine
can build a model from a *preset*: a real transformers architecture (Qwen2) at a real shape,
with weights drawn from a fixed seed. Attention, RoPE, GQA and the KV the store holds are then
exactly what the pretrained model would produce; only the numbers in the weights are random,
which does not matter for a cache whose job is to return the same KV bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vua_nixl_engine.errors import ModelLoadError


@dataclass(frozen=True)
class Preset:
    """A Qwen2-architecture shape. ``tokenizer_vocab`` is the size of the offline BPE tokenizer
    (at most ``vocab_size``; like Qwen's own, the embedding table may be larger)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    kv_heads: int
    intermediate_size: int
    vocab_size: int
    tokenizer_vocab: int
    max_context: int
    dtype: str = "bfloat16"
    rope_theta: float = 1_000_000.0
    #: std of the random weights. transformers' 0.02 makes a random tied-embedding model repeat
    #: one token forever; a larger std gives varied greedy output, which makes "same tokens"
    #: checks meaningful.
    init_std: float = 0.02
    description: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * getattr(torch, self.dtype).itemsize


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        num_layers=2,
        hidden_size=64,
        num_heads=4,
        kv_heads=2,
        intermediate_size=128,
        vocab_size=512,
        tokenizer_vocab=512,
        max_context=2048,
        init_std=0.3,
        description="2 layers, hidden 64: for tests (milliseconds per request)",
    ),
    "small": Preset(
        name="small",
        num_layers=8,
        hidden_size=512,
        num_heads=8,
        kv_heads=2,
        intermediate_size=1536,
        vocab_size=8192,
        tokenizer_vocab=8192,
        max_context=8192,
        init_std=0.1,
        description="8 layers, hidden 512 (~30M params): a quick demo on slow machines",
    ),
    "qwen2-0.5b": Preset(
        name="qwen2-0.5b",
        num_layers=24,
        hidden_size=896,
        num_heads=14,
        kv_heads=2,
        intermediate_size=4864,
        vocab_size=151936,  # Qwen2.5-0.5B's full embedding table (tied with lm_head)
        tokenizer_vocab=8192,
        max_context=32768,
        init_std=0.05,
        description="Qwen2.5-0.5B shape: 24 layers, hidden 896, 14 heads, 2 KV heads, vocab 151936",
    ),
}


def get_preset(name: str) -> Preset:
    """Look up a preset by name, with an error that lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelLoadError(
            f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)} "
            "(or pass a path to a local Hugging Face model directory)"
        ) from None


def build_config(preset: Preset, *, special_token_ids: dict[str, int] | None = None):
    """A transformers ``Qwen2Config`` for the preset (full attention in every layer)."""
    from transformers import Qwen2Config

    ids = special_token_ids or {}
    cfg = Qwen2Config(
        vocab_size=preset.vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.kv_heads,
        max_position_embeddings=preset.max_context,
        rope_parameters={"rope_type": "default", "rope_theta": preset.rope_theta},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=ids.get("bos"),
        eos_token_id=ids.get("eos"),
        pad_token_id=ids.get("pad"),
    )
    cfg.initializer_range = preset.init_std
    cfg.dtype = getattr(torch, preset.dtype)
    cfg.architectures = ["Qwen2ForCausalLM"]
    return cfg


def build_model(preset: Preset, *, seed: int = 0, dtype: torch.dtype | None = None, special_token_ids: dict[str, int] | None = None):
    """Instantiate the preset with random weights drawn from ``seed`` (same seed, same weights).

    The generator is seeded locally and restored afterwards, so building a model does not
    disturb the caller's global RNG state.
    """
    from transformers import Qwen2ForCausalLM

    cfg = build_config(preset, special_token_ids=special_token_ids)
    dtype = dtype or getattr(torch, preset.dtype)
    cfg.dtype = dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM._from_config(cfg, dtype=dtype)
    model.eval()
    return model

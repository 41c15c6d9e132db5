"""An offline byte-level BPE tokenizer with a ChatML chat template.

Dynamo's frontend (and any Hugging Face tooling) needs ``tokenizer.json`` plus a
``tokenizer_config.json`` that carries a ``chat_template``. There is no hub here, so the
tokenizer is trained with the ``tokenizers`` library on a fixed synthetic corpus; training is
deterministic, so every machine builds byte-for-byte the same tokenizer for a preset.
"""

from __future__ import annotations

import json
from pathlib import Path

from vua_nixl_engine.text import training_corpus

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

#: The ChatML template Qwen2 models use (system prompt optional, generation prompt on request).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(vocab_size: int):
    """Train the byte-level BPE (a ``tokenizers.Tokenizer``) on the synthetic corpus.

    Special tokens get ids 0..2, the 256 byte symbols follow, merges fill the rest up to
    ``vocab_size`` (fewer if the corpus runs out of pairs).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer)
    return tok


def special_token_ids(tok) -> dict[str, int]:
    """bos/eos/pad ids as a Qwen2 config and generation config expect them."""
    return {
        "bos": tok.token_to_id(ENDOFTEXT),
        "eos": tok.token_to_id(IM_END),
        "pad": tok.token_to_id(ENDOFTEXT),
        "endoftext": tok.token_to_id(ENDOFTEXT),
    }


def tokenizer_config(model_max_length: int, tok) -> dict:
    """Contents of ``tokenizer_config.json``, chat template included (what Dynamo reads)."""
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer_files(directory: Path, vocab_size: int, model_max_length: int) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; return special ids."""
    tok = train_tokenizer(vocab_size)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(model_max_length, tok), indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": IM_END, "pad_token": ENDOFTEXT, "additional_special_tokens": [IM_START, IM_END]}, indent=2)
        + "\n"
    )
    return special_token_ids(tok)


def build_tokenizer(vocab_size: int, model_max_length: int):
    """An in-memory ``PreTrainedTokenizerFast`` identical to what :func:`write_tokenizer_files` writes."""
    from transformers import PreTrainedTokenizerFast

    tok = train_tokenizer(vocab_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    ), special_token_ids(tok)

"""Model directories: write one from a preset, load any local Hugging Face causal LM.

A model directory is what every tool in the stack agrees on (transformers, Dynamo's frontend,
vLLM): ``config.json`` + ``*.safetensors`` + ``tokenizer.json`` + ``tokenizer_config.json`` (with a
chat template) + ``generation_config.json``. Loading validates each piece up front so a bad
directory is one clear error at startup, never a crash in the middle of serving a request.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import xxhash

from vua_nixl_engine.errors import ModelLoadError
from vua_nixl_engine.presets import Preset, build_model, get_preset
from vua_nixl_engine.tokenizer import build_tokenizer, write_tokenizer_files

log = logging.getLogger(__name__)

#: Files that make a directory complete; ``make-model`` writes all of them.
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")

#: Written last into a built directory; its presence means the build finished.
_COMPLETE_MARKER = ".vua-nixl-complete"


@dataclass
class LoadedModel:
    """A model ready for the engine, with the identity its KV is namespaced under."""

    model: Any  # transformers PreTrainedModel (causal LM)
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    model_id: str  # Namespace.model
    revision: str  # Namespace.revision: changes whenever the weights may differ
    max_context: int
    eos_token_ids: list[int] = field(default_factory=list)
    source: str = ""  # preset name or directory path, for messages


def _eos_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def build_preset(preset: str | Preset, *, seed: int = 0, dtype: torch.dtype | None = None) -> LoadedModel:
    """Build a preset in memory (random weights from ``seed``) with its offline tokenizer."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    tokenizer, ids = build_tokenizer(p.tokenizer_vocab, p.max_context)
    model = build_model(p, seed=seed, dtype=dtype, special_token_ids=ids)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=f"vua-nixl/{p.name}",
        revision=f"random-seed{seed}",
        max_context=p.max_context,
        eos_token_ids=[ids["eos"], ids["endoftext"]],
        source=f"preset {p.name}",
    )


def make_model_dir(preset: str | Preset, out: str | os.PathLike, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a complete model directory for ``preset`` to ``out`` and return its path.

    The directory is built under a temporary name beside ``out`` and renamed into place, so an
    interrupted build never leaves a half-written model that a later run would try to serve.
    An existing complete directory is kept unless ``overwrite``.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    out = Path(out)
    if is_complete_model_dir(out) and not overwrite:
        log.info("model directory %s already exists; reusing it", out)
        return out
    if out.exists() and not overwrite and any(out.iterdir()):
        raise ModelLoadError(f"{out} exists and is not an empty or complete model directory; pass overwrite=True / --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        ids = write_tokenizer_files(tmp, p.tokenizer_vocab, p.max_context)
        model = build_model(p, seed=seed, special_token_ids=ids)
        gen = model.generation_config
        gen.bos_token_id = ids["bos"]
        gen.eos_token_id = [ids["eos"], ids["endoftext"]]
        gen.pad_token_id = ids["pad"]
        gen.do_sample = False
        model.save_pretrained(tmp, safe_serialization=True)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["vua_nixl"] = {"preset": p.name, "seed": seed, "weights": "random"}
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        missing = [f for f in MODEL_FILES if not (tmp / f).exists()]
        if missing:
            raise ModelLoadError(f"building preset {p.name} did not produce {', '.join(missing)}")
        (tmp / _COMPLETE_MARKER).write_text(json.dumps({"preset": p.name, "seed": seed}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote model directory %s (preset %s, seed %d)", out, p.name, seed)
    return out


def is_complete_model_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / _COMPLETE_MARKER).exists() and all((path / f).exists() for f in MODEL_FILES)


def _weights_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        files = sorted(path.glob("pytorch_model*.bin"))
    return files


def weights_fingerprint(path: Path) -> str:
    """A cheap fingerprint of a model directory's weights: config.json plus, per weight file,
    its name, size and first and last MiB. Fine-tunes of one architecture share a config and
    safetensors headers but not weight bytes, so their KV never shares a key space; reading two
    MiB per file keeps this instant even for very large checkpoints."""
    h = xxhash.xxh3_64()
    h.update((path / "config.json").read_bytes())
    sample = 1 << 20
    for f in _weights_files(path):
        size = f.stat().st_size
        h.update(f.name.encode() + size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            h.update(fh.read(sample))
            if size > sample:
                fh.seek(max(sample, size - sample))
                h.update(fh.read(sample))
    return h.hexdigest()


def _read_config_json(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"model directory {path} has no config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ModelLoadError(f"{cfg_file} has no model_type; cannot tell which architecture this is")
    return cfg


def check_supported(config: Any, where: str) -> None:
    """Reject configs whose KV the paged engine cannot hold in ``[layers, 2, tokens, kv_heads, head_dim]``
    form: sliding-window / hybrid layers, MLA latents, encoder-decoders."""
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(f"{where}: encoder-decoder models are not supported (decoder-only causal LMs only)")
    if getattr(config, "kv_lora_rank", None):
        raise ModelLoadError(f"{where}: MLA (latent) attention is not supported by the paged engine yet")
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        kinds = sorted(set(layer_types))
        raise ModelLoadError(f"{where}: only full-attention layers are supported, this model has {kinds}")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise ModelLoadError(f"{where}: sliding-window attention is not supported")
    for attr in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        if not getattr(config, attr, None):
            raise ModelLoadError(f"{where}: config has no {attr}; not a standard decoder-only transformer")


def load_model_dir(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a local Hugging Face causal-LM directory (no network access is attempted)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a directory (expected a Hugging Face model directory)")
    raw = _read_config_json(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"unknown architecture {raw.get('model_type')!r} in {path / 'config.json'}: "
            f"this transformers version cannot build it ({str(exc).splitlines()[0][:200]})"
        ) from None
    check_supported(config, str(path))
    if not _weights_files(path):
        raise ModelLoadError(f"model directory {path} has no weights (model.safetensors or *.safetensors)")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise ModelLoadError(f"model directory {path} has no tokenizer.json")
    if not (path / "tokenizer_config.json").is_file():
        raise ModelLoadError(f"model directory {path} has no tokenizer_config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # tokenizer loaders raise many types; all mean "unusable"
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {exc}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype or "auto")
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {raw.get('architectures') or raw.get('model_type')} is not a causal LM transformers can load: {str(exc).splitlines()[0][:200]}") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read the weights in {path}: {exc}") from None
    model.to(device)
    model.eval()
    max_context = int(getattr(config, "max_position_embeddings", 0) or getattr(tokenizer, "model_max_length", 0) or 2048)
    eos = _eos_list(getattr(model.generation_config, "eos_token_id", None)) or _eos_list(config.eos_token_id)
    meta = raw.get("vua_nixl") or {}
    model_id = f"vua-nixl/{meta['preset']}" if meta.get("preset") else (raw.get("_name_or_path") or path.name)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=str(model_id),
        revision=weights_fingerprint(path),
        max_context=max_context,
        eos_token_ids=eos,
        source=str(path),
    )


def load_model(model: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, seed: int = 0) -> LoadedModel:
    """A preset name (``tiny``, ``qwen2-0.5b``, ...) or a path to a model directory."""
    from vua_nixl_engine.presets import PRESETS

    if isinstance(model, str) and model in PRESETS and not Path(model).exists():
        loaded = build_preset(model, seed=seed, dtype=dtype)
        loaded.model.to(device)
        return loaded
    if isinstance(model, str) and os.sep not in model and not Path(model).exists():
        raise ModelLoadError(
            f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing model directory"
        )
    return load_model_dir(model, device=device, dtype=dtype)

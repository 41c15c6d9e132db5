"""KV-cache sizing for a model, and the nixlbench run that matches it (``vua-nixl plan``).

The point of the plan is to turn "will loading KV from storage beat recomputing it?" into numbers
an operator can check with one nixlbench run: the bytes one 256-token chunk occupies on one GPU
is the block size, the chunk count of a request is the batch size, and bytes / bandwidth is the
load time to compare against prefill.

Sizing rules (per GPU, i.e. per tensor-parallel rank):

* standard / GQA attention stores K and V for each KV head:
  ``layers * 2 * kv_heads_per_rank * head_dim * itemsize`` bytes per token. Tensor parallelism
  splits the KV heads across ranks; when ``tp > kv_heads`` each rank still needs a whole head,
  so heads are replicated (``tp`` must then be a multiple of ``kv_heads``, as in vLLM/SGLang).
* MLA (DeepSeek-V2/V3 style) caches one compressed latent of ``kv_lora_rank + qk_rope_head_dim``
  values per token per layer, shared by all heads, so TP does not split it: every rank holds the
  full latent (``layers * (kv_lora_rank + qk_rope_head_dim) * itemsize``).
* only whole chunks are stored, so a request's stored bytes use ``tokens // chunk_tokens`` chunks.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .nbconfig import NixlbenchConfig, format_bytes

log = logging.getLogger(__name__)

#: Bytes per element for the dtypes a KV cache is kept in.
DTYPE_BYTES: dict[str, int] = {
    "float32": 4, "fp32": 4, "float": 4,
    "bfloat16": 2, "bf16": 2,
    "float16": 2, "fp16": 2, "half": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1,
    "int8": 1, "uint8": 1,
}

#: O_DIRECT / GDS transfers must be multiples of this (one page / cuFile alignment).
IO_ALIGN = 4096


def dtype_bytes(dtype: str) -> int:
    """Item size of a KV dtype name such as ``bf16`` or ``torch.float8_e4m3fn``."""
    key = dtype.lower().removeprefix("torch.")
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown KV dtype {dtype!r}; known: {', '.join(sorted(DTYPE_BYTES))}")
    return DTYPE_BYTES[key]


@dataclass(frozen=True)
class ModelShape:
    """The attention shape that decides KV size, plus what a prefill-time estimate needs.

    ``params`` / ``active_params`` are total and per-token-active parameter counts (they differ
    for mixture-of-experts models); 0 means unknown, and prefill is then not estimated.
    """

    name: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int = 0
    mla: bool = False
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    params: float = 0.0
    active_params: float = 0.0
    default_dtype: str = "bfloat16"
    source: str = "preset"

    # -- KV arithmetic ------------------------------------------------------------------------
    def kv_heads_per_rank(self, tp: int = 1) -> int:
        """KV heads each TP rank holds (MLA: the single latent, never split)."""
        if tp < 1:
            raise ValueError("tp must be >= 1")
        if self.mla:
            return 1
        if tp <= self.num_kv_heads:
            if self.num_kv_heads % tp:
                raise ValueError(f"{self.name}: {self.num_kv_heads} KV heads cannot be split over tp={tp}")
            return self.num_kv_heads // tp
        if tp % self.num_kv_heads:
            raise ValueError(
                f"{self.name}: tp={tp} > {self.num_kv_heads} KV heads requires tp to be a multiple of "
                f"the KV head count (heads are replicated)"
            )
        return 1

    def kv_values_per_token(self, tp: int = 1) -> int:
        """Scalars of KV one rank stores per token, over all layers."""
        if self.mla:
            return self.num_layers * (self.kv_lora_rank + self.qk_rope_head_dim)
        return self.num_layers * 2 * self.kv_heads_per_rank(tp) * self.head_dim

    def kv_bytes_per_token(self, dtype: str | None = None, tp: int = 1) -> int:
        """KV bytes one rank stores per token."""
        return self.kv_values_per_token(tp) * dtype_bytes(dtype or self.default_dtype)

    def replication(self, tp: int) -> int:
        """How many ranks hold each KV byte (1 = pure split)."""
        if self.mla:
            return tp
        return max(1, tp // self.num_kv_heads)

    # -- prefill estimate ---------------------------------------------------------------------
    def prefill_flops(self, tokens: int) -> float:
        """Forward FLOPs to prefill ``tokens`` from scratch (causal attention, no cache).

        ``2 * active_params * tokens`` for the weight matmuls, plus the attention score/value
        products ``layers * heads * tokens^2 * (d_qk + d_v)`` (causal mask halves the square).
        This is the usual first-order model; it ignores norms, softmax and MoE routing.
        """
        if not self.active_params and not self.params:
            return 0.0
        active = self.active_params or self.params
        if self.mla:
            d_qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            d_v = self.v_head_dim or self.qk_nope_head_dim
        else:
            d_qk = d_v = self.head_dim
        attn = self.num_layers * self.num_attention_heads * float(tokens) ** 2 * (d_qk + d_v)
        return 2.0 * active * tokens + attn


# Shapes from the models' published config.json files.
PRESETS: dict[str, ModelShape] = {
    "qwen2-0.5b": ModelShape(
        "Qwen/Qwen2.5-0.5B", num_layers=24, num_attention_heads=14, num_kv_heads=2, head_dim=64,
        hidden_size=896, params=0.494e9),
    "qwen2.5-7b": ModelShape(
        "Qwen/Qwen2.5-7B", num_layers=28, num_attention_heads=28, num_kv_heads=4, head_dim=128,
        hidden_size=3584, params=7.62e9),
    "llama-3.2-3b": ModelShape(
        "meta-llama/Llama-3.2-3B", num_layers=28, num_attention_heads=24, num_kv_heads=8, head_dim=128,
        hidden_size=3072, params=3.21e9),
    "llama-3.1-8b": ModelShape(
        "meta-llama/Llama-3.1-8B", num_layers=32, num_attention_heads=32, num_kv_heads=8, head_dim=128,
        hidden_size=4096, params=8.03e9),
    "llama-3.1-70b": ModelShape(
        "meta-llama/Llama-3.1-70B", num_layers=80, num_attention_heads=64, num_kv_heads=8, head_dim=128,
        hidden_size=8192, params=70.6e9),
    "qwen3-8b": ModelShape(
        "Qwen/Qwen3-8B", num_layers=36, num_attention_heads=32, num_kv_heads=8, head_dim=128,
        hidden_size=4096, params=8.19e9),
    "qwen3-32b": ModelShape(
        "Qwen/Qwen3-32B", num_layers=64, num_attention_heads=64, num_kv_heads=8, head_dim=128,
        hidden_size=5120, params=32.8e9),
    "deepseek-v3": ModelShape(
        "deepseek-ai/DeepSeek-V3", num_layers=61, num_attention_heads=128, num_kv_heads=1, head_dim=576,
        hidden_size=7168, mla=True, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
        v_head_dim=128, params=671e9, active_params=37e9),
}
ALIASES: dict[str, str] = {
    "qwen2.5-0.5b": "qwen2-0.5b", "qwen/qwen2.5-0.5b": "qwen2-0.5b", "qwen/qwen2-0.5b": "qwen2-0.5b",
    "llama3.1-8b": "llama-3.1-8b", "meta-llama/llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b",
    "llama3.2-3b": "llama-3.2-3b", "meta-llama/llama-3.2-3b": "llama-3.2-3b",
    "meta-llama/llama-3.2-3b-instruct": "llama-3.2-3b",
    "qwen/qwen3-32b": "qwen3-32b", "qwen/qwen3-8b": "qwen3-8b", "qwen/qwen2.5-7b": "qwen2.5-7b",
    "deepseek-r1": "deepseek-v3", "deepseek-ai/deepseek-v3": "deepseek-v3",
    "deepseek-ai/deepseek-r1": "deepseek-v3", "llama-3.1-70b-instruct": "llama-3.1-70b",
}


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs nest the language model under ``text_config``/``llm_config``."""
    if "num_hidden_layers" in cfg:
        return cfg
    for key in ("text_config", "llm_config", "language_config"):
        sub = cfg.get(key)
        if isinstance(sub, dict) and "num_hidden_layers" in sub:
            return sub
    return cfg


def estimate_params(cfg: dict[str, Any]) -> tuple[float, float]:
    """(total, active) parameter estimate from an HF config: embeddings, attention and MLP/MoE
    matmuls. Norms and biases are ignored (well under 1%)."""
    h = int(cfg.get("hidden_size", 0))
    if not h:
        return 0.0, 0.0
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg.get("num_attention_heads", 1))
    kv = int(cfg.get("num_key_value_heads", heads))
    hd = int(cfg.get("head_dim") or h // heads)
    vocab = int(cfg.get("vocab_size", 0))
    tied = bool(cfg.get("tie_word_embeddings", False))
    embed = vocab * h * (1 if tied else 2)
    if cfg.get("kv_lora_rank"):
        r, rope = int(cfg["kv_lora_rank"]), int(cfg.get("qk_rope_head_dim", 0))
        nope, v = int(cfg.get("qk_nope_head_dim", hd)), int(cfg.get("v_head_dim", hd))
        qr = int(cfg.get("q_lora_rank") or 0)
        q = (h * qr + qr * heads * (nope + rope)) if qr else h * heads * (nope + rope)
        attn = q + h * (r + rope) + r * heads * (nope + v) + heads * v * h
    else:
        attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    inter = int(cfg.get("intermediate_size", 4 * h))
    n_exp = int(cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    if n_exp:
        moe_i = int(cfg.get("moe_intermediate_size") or inter)
        topk = int(cfg.get("num_experts_per_tok", 1))
        shared = int(cfg.get("n_shared_experts") or 0)
        dense_layers = int(cfg.get("first_k_dense_replace", 0))
        moe_layers = layers - dense_layers
        mlp_total = dense_layers * 3 * h * inter + moe_layers * 3 * h * moe_i * (n_exp + shared)
        mlp_active = dense_layers * 3 * h * inter + moe_layers * 3 * h * moe_i * (topk + shared)
    else:
        mlp_total = mlp_active = layers * 3 * h * inter
    total = embed + layers * attn + mlp_total
    active = embed + layers * attn + mlp_active
    return float(total), float(active)


def shape_from_hf_config(cfg: dict[str, Any], name: str = "hf-model") -> ModelShape:
    """Build a ModelShape from a Hugging Face ``config.json`` dict (GQA or MLA)."""
    cfg = _text_config(cfg)
    try:
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
    except KeyError as exc:
        raise ValueError(f"config.json lacks {exc.args[0]}; is this a decoder LLM config?") from None
    hidden = int(cfg.get("hidden_size", 0))
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    if dtype.lower().removeprefix("torch.") not in DTYPE_BYTES:
        dtype = "bfloat16"
    total, active = estimate_params(cfg)
    if cfg.get("kv_lora_rank"):
        r, rope = int(cfg["kv_lora_rank"]), int(cfg.get("qk_rope_head_dim", 0))
        return ModelShape(
            name, num_layers=layers, num_attention_heads=heads, num_kv_heads=1, head_dim=r + rope,
            hidden_size=hidden, mla=True, kv_lora_rank=r, qk_rope_head_dim=rope,
            qk_nope_head_dim=int(cfg.get("qk_nope_head_dim", 0)), v_head_dim=int(cfg.get("v_head_dim", 0)),
            params=total, active_params=active, default_dtype=dtype, source="config.json")
    kv = int(cfg.get("num_key_value_heads") or heads)
    hd = int(cfg.get("head_dim") or (hidden // heads if hidden else 0))
    if hd <= 0:
        raise ValueError("cannot determine head_dim from config.json")
    return ModelShape(
        name, num_layers=layers, num_attention_heads=heads, num_kv_heads=kv, head_dim=hd,
        hidden_size=hidden, params=total, active_params=active if active != total else 0.0,
        default_dtype=dtype, source="config.json")


def resolve_model(model: str) -> ModelShape:
    """A preset name (or alias), an HF model directory, or a path to a config.json."""
    key = model.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    if key in ALIASES:
        return PRESETS[ALIASES[key]]
    by_name = [s for s in PRESETS.values() if s.name.lower() == key]  # a preset's HF name, as plans print it
    if by_name:
        return by_name[0]
    p = Path(model).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        p = p / "config.json"
    if p.is_file():
        with p.open() as f:
            cfg = json.load(f)
        name = cfg.get("_name_or_path") or p.parent.name
        return shape_from_hf_config(cfg, name=str(name))
    raise ValueError(
        f"unknown model {model!r}: give an HF model directory with config.json or a preset "
        f"({', '.join(PRESETS)})"
    )


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


@dataclass
class KVPlan:
    """Everything ``vua-nixl plan`` prints, per TP rank unless a field says otherwise."""

    model: str
    tokens: int
    tp: int
    chunk_tokens: int
    dtype: str
    mla: bool
    kv_heads_per_rank: int
    bytes_per_token: int            # per rank
    chunk_bytes: int                # per rank, one chunk
    num_chunks: int                 # full chunks stored for the request
    stored_tokens: int
    request_bytes: int              # per rank, stored chunks only
    request_bytes_all_ranks: int    # what the store holds for this request, all ranks together
    replication: int
    bandwidth_gbps: float
    load_seconds: float             # per rank at bandwidth_gbps (ranks load in parallel)
    prefill_tflops: float = 0.0
    prefill_seconds: float | None = None
    speedup: float | None = None
    nixlbench_block_size: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_plan(shape: ModelShape, tokens: int, tp: int = 1, chunk_tokens: int = 256,
              dtype: str | None = None, bandwidth_gbps: float = 35.0,
              prefill_tflops: float = 0.0) -> KVPlan:
    """Size one request's KV for ``shape`` and time its load at ``bandwidth_gbps`` (1e9 B/s)."""
    if tokens < 0 or chunk_tokens <= 0:
        raise ValueError("tokens must be >= 0 and chunk_tokens > 0")
    dtype = dtype or shape.default_dtype
    bpt = shape.kv_bytes_per_token(dtype, tp)
    chunk = bpt * chunk_tokens
    n = tokens // chunk_tokens
    req = chunk * n
    notes = []
    if tokens % chunk_tokens:
        notes.append(f"{tokens % chunk_tokens} trailing tokens do not fill a chunk and are not stored")
    if shape.mla and tp > 1:
        notes.append("MLA latent is replicated on every TP rank (not split)")
    elif not shape.mla and tp > shape.num_kv_heads:
        notes.append(f"tp={tp} > {shape.num_kv_heads} KV heads: each head is replicated on "
                     f"{tp // shape.num_kv_heads} ranks")
    nb_block = _round_up(chunk, IO_ALIGN)
    if nb_block != chunk:
        notes.append(f"chunk of {chunk} B is not 4 KiB aligned; nixlbench O_DIRECT block rounded to {nb_block} B "
                     "(the store pads chunk payloads to 4 KiB the same way)")
    load = req / (bandwidth_gbps * 1e9) if bandwidth_gbps > 0 else math.inf
    plan = KVPlan(
        model=shape.name, tokens=tokens, tp=tp, chunk_tokens=chunk_tokens, dtype=dtype, mla=shape.mla,
        kv_heads_per_rank=shape.kv_heads_per_rank(tp), bytes_per_token=bpt, chunk_bytes=chunk,
        num_chunks=n, stored_tokens=n * chunk_tokens, request_bytes=req,
        request_bytes_all_ranks=req * tp, replication=shape.replication(tp),
        bandwidth_gbps=bandwidth_gbps, load_seconds=load, nixlbench_block_size=nb_block, notes=notes)
    if prefill_tflops > 0:
        flops = shape.prefill_flops(tokens)
        if flops:
            plan.prefill_tflops = prefill_tflops
            plan.prefill_seconds = flops / (prefill_tflops * 1e12 * tp)
            plan.speedup = plan.prefill_seconds / load if load > 0 else None
        else:
            notes.append("parameter count unknown: no prefill estimate")
    return plan


def nixlbench_config_for(plan: KVPlan, backend: str = "GDS", op: str = "READ", filepath: str = "/mnt/kv/nixlbench",
                         num_iter: int = 160, warmup_iter: int = 16, direct: bool = True) -> NixlbenchConfig:
    """The KV-shaped nixlbench run for a plan: block = one chunk on one rank, batch = the
    request's chunk count, one thread (one request on one GPU). GDS uses a VRAM buffer, the
    POSIX backends a DRAM one."""
    backend = backend.upper()
    batch = max(plan.num_chunks, 1)
    block = plan.nixlbench_block_size if direct else plan.chunk_bytes
    values: dict[str, Any] = {
        "backend": backend,
        "op_type": op.upper(),
        "initiator_seg_type": "VRAM" if backend in ("GDS", "GDS_MT") else "DRAM",
        "target_seg_type": "VRAM" if backend in ("GDS", "GDS_MT") else "DRAM",
        "storage_enable_direct": direct,
        "check_consistency": True,
        "filepath": filepath,
        "total_buffer_size": block * batch,
        "start_block_size": block,
        "max_block_size": block,
        "start_batch_size": batch,
        "max_batch_size": batch,
        "num_threads": 1,
        "num_iter": num_iter,
        "warmup_iter": warmup_iter,
    }
    if backend == "GDS_MT":
        values["gds_mt_num_threads"] = 8
    if backend == "POSIX":
        values["posix_api_type"] = "AIO"  # what the store's posix_io=auto picks (docs/BENCHMARKS.md, "I/O engine")
    comment = (
        f"KV-shaped {op.upper()} for {plan.model}: {plan.tokens} tokens, tp={plan.tp}, {plan.dtype}, "
        f"chunk_tokens={plan.chunk_tokens}\n"
        f"block = one chunk on one rank = {plan.chunk_bytes} B ({format_bytes(plan.chunk_bytes)}); "
        f"batch = {batch} chunks = {format_bytes(block * batch)} per request per rank\n"
        f"generated by `vua-nixl plan --model {plan.model} --tokens {plan.tokens} --tp {plan.tp}`; run on each GPU "
        f"of the TP group"
    )
    return NixlbenchConfig.from_dict(values, comment=comment)


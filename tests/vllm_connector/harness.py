"""A real vLLM engine core on CPU, minus the model: vLLM's ``Scheduler`` with our connector (built
by vLLM's connector factory from ``kv_transfer_config``), the worker-side connector driven by
vLLM's own ``KVConnectorModelRunnerMixin``, and KV caches allocated by vLLM's own
``allocate_kv_cache`` from a ``KVCacheConfig`` that vLLM's ``get_kv_cache_configs`` computed.

Only the forward pass is replaced: :class:`Engine` "computes" KV by writing random bytes into the
slots of the scheduled tokens (through the block table the scheduler allocated), so any KV that
shows up later in another engine can only have come through the store. Also runnable as a script
(``python harness.py SPEC.json``) to get a fresh engine in another process.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

NUM_LAYERS = 2
KV_HEADS = 2
HEAD_DIM = 16
EOS = 2
LAYER_NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(NUM_LAYERS)]


def make_tiny_model(path: Path) -> Path:
    """A tiny Llama config + word-level tokenizer, built offline (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path.mkdir(parents=True, exist_ok=True)
    if (path / "config.json").exists():
        return path
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": NUM_LAYERS, "num_attention_heads": 4, "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "vocab_size": 1024, "max_position_embeddings": 4096, "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": EOS, "tie_word_embeddings": False,
        "rope_theta": 10000.0,
    }
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 1024)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def kv_transfer(store_root: str, **extra: Any) -> dict[str, Any]:
    return {
        "kv_connector": "VuaNixlConnector",
        "kv_connector_module_path": "dynamo_components.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"store_root": store_root, "backend": "POSIX", **extra},
    }


def make_vllm_config(model_dir: str, transfer: dict[str, Any], *, block_size: int = 16, cache_dtype: str = "auto",
                     tp_size: int = 1, events_endpoint: Optional[str] = None, max_batched: int = 512,
                     layout: str = "LBNHC") -> Any:
    from vllm.config import (
        CacheConfig,
        DeviceConfig,
        KVEventsConfig,
        KVTransferConfig,
        ModelConfig,
        ParallelConfig,
        SchedulerConfig,
        VllmConfig,
    )

    model = ModelConfig(model=model_dir, dtype="bfloat16", seed=0, max_model_len=2048)
    sched = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=max_batched, max_model_len=2048,
                            is_encoder_decoder=False)
    cache = CacheConfig(block_size=block_size, cache_dtype=cache_dtype, enable_prefix_caching=True)
    cache.kv_cache_layout = layout  # the engine core resolves this before connectors are built
    kwargs: dict[str, Any] = {}
    if events_endpoint:
        kwargs["kv_events_config"] = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                                    endpoint=events_endpoint, topic="kv-events")
    return VllmConfig(model_config=model, scheduler_config=sched, cache_config=cache,
                      parallel_config=ParallelConfig(tensor_parallel_size=tp_size),
                      kv_transfer_config=KVTransferConfig(**transfer), device_config=DeviceConfig("cpu"), **kwargs)


def kv_cache_config_for(vllm_config: Any, num_blocks: int = 256) -> Any:
    try:  # vLLM 0.31
        from vllm.v1.core.kv_cache_utils import get_kv_cache_configs
    except ImportError:  # vLLM 0.33 moved it
        from vllm.v1.core.kv_cache_planning import get_kv_cache_configs
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    cache = vllm_config.cache_config
    dtype = torch.bfloat16
    if cache.cache_dtype.startswith("fp8"):
        dtype = torch.float8_e5m2 if "e5m2" in cache.cache_dtype else torch.float8_e4m3fn
    spec = FullAttentionSpec(block_size=cache.block_size, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=dtype)
    specs = {name: spec for name in LAYER_NAMES}
    memory = [spec.page_size_bytes * NUM_LAYERS * num_blocks]
    if "global_kv_cache_groups" in inspect.signature(get_kv_cache_configs).parameters:  # vLLM 0.33
        from vllm.v1.core.kv_cache_planning import get_kv_cache_groups

        (cfg,) = get_kv_cache_configs(vllm_config, [specs], memory, get_kv_cache_groups(vllm_config, specs))
    else:
        (cfg,) = get_kv_cache_configs(vllm_config, [specs], memory)
    cache.num_gpu_blocks = cfg.num_blocks
    return cfg


_DIST = False


def init_single_rank() -> None:
    """A one-rank gloo 'TP group' (the worker-side connector asks for its TP/PP rank)."""
    global _DIST
    if _DIST:
        return
    from vllm.distributed.parallel_state import init_distributed_environment, initialize_model_parallel

    fd, path = tempfile.mkstemp(prefix="vua-vllm-dist-")
    os.close(fd)
    os.unlink(path)
    init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"file://{path}", local_rank=0,
                                 backend="gloo")
    initialize_model_parallel(1, 1)
    _DIST = True


class Engine:
    """vLLM scheduler + worker-side connector + real paged KV caches; a fake forward pass."""

    def __init__(self, vllm_config: Any, num_blocks: int = 256, seed: int = 0) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.distributed.kv_transfer import get_kv_transfer_group
        from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_initialized, ensure_kv_transfer_shutdown
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.structured_output import StructuredOutputManager
        from vllm.v1.worker.utils import allocate_kv_cache

        self.config = vllm_config
        self.block_size = vllm_config.cache_config.block_size
        self.gen = torch.Generator().manual_seed(seed)
        with set_current_vllm_config(vllm_config):
            init_single_rank()
            self.kv_cache_config = kv_cache_config_for(vllm_config, num_blocks)
            self.scheduler = Scheduler(
                vllm_config=vllm_config, kv_cache_config=self.kv_cache_config,
                structured_output_manager=StructuredOutputManager(vllm_config), block_size=self.block_size,
                log_stats=True,
            )
            ensure_kv_transfer_shutdown()
            ensure_kv_transfer_initialized(vllm_config, self.kv_cache_config)
            self.worker = get_kv_transfer_group()
            self.kv_caches = allocate_kv_cache(
                self.kv_cache_config, torch.device("cpu"), vllm_config.cache_config.get_resolved_kv_cache_layout(),
                [self.block_size],
            )
            self.worker.register_kv_caches(self.kv_caches)
        self.connector = self.scheduler.connector
        self.outputs: dict[str, list[int]] = {}
        self.step_outputs: list[Any] = []
        self.computed: dict[str, int] = {}  # tokens "computed" by the fake model, per request
        self.first_sched: dict[str, tuple[int, int]] = {}  # req -> (tokens, first position) when first run
        self.tables: dict[str, list[int]] = {}  # req -> its block table, last seen
        self.invalid_blocks: set[int] = set()  # block ids the worker reported as failed loads

    # ---- requests --------------------------------------------------------------------------

    def add(self, req_id: str, prompt: list[int], max_tokens: int = 1) -> Any:
        from vllm import SamplingParams
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.request import Request

        init_none_hash(sha256)
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        sp.update_from_generation_config({}, EOS)
        req = Request(request_id=req_id, prompt_token_ids=list(prompt), sampling_params=sp, pooling_params=None,
                      block_hasher=get_request_block_hasher(self.block_size, sha256))
        self.scheduler.add_request(req)
        self.outputs[req_id] = []
        return req

    # ---- one engine step -------------------------------------------------------------------------

    def step(self, after_schedule: Any = None) -> Any:
        from vllm.forward_context import set_forward_context
        from vllm.v1.outputs import ModelRunnerOutput
        from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin

        out = self.scheduler.schedule()
        if after_schedule is not None:
            after_schedule(out)
        with set_forward_context(None, self.config), \
                KVConnectorModelRunnerMixin.maybe_get_kv_connector_output(out) as kv_out:
            sampled = self._fake_forward(out)
        req_ids = list(sampled)
        mro = ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                sampled_token_ids=[sampled[r] for r in req_ids], kv_connector_output=kv_out)
        if kv_out is not None and kv_out.invalid_block_ids:
            self.invalid_blocks |= set(kv_out.invalid_block_ids)
        self.scheduler.update_from_output(out, mro)
        self.step_outputs.append(out)
        return out

    def _fake_forward(self, out: Any) -> dict[str, list[int]]:
        """Write random KV into every scheduled token's slot; sample token 100+len for finished prefills."""
        sampled: dict[str, list[int]] = {}
        for rid, n in out.num_scheduled_tokens.items():
            req = self.scheduler.requests[rid]
            end = req.num_computed_tokens  # already advanced by schedule()
            start = end - n
            (block_ids,) = self.scheduler.kv_cache_manager.get_block_ids(rid)
            self.tables[rid] = list(block_ids)
            self.first_sched.setdefault(rid, (n, start))
            for pos in range(start, end):
                blk, off = block_ids[pos // self.block_size], pos % self.block_size
                for name in LAYER_NAMES:
                    t = self.kv_caches[name]  # [blocks, heads, block_size, 2*head_dim]
                    raw = torch.randint(0, 256, (t.shape[1], t.shape[3] * t.element_size()), generator=self.gen,
                                        dtype=torch.uint8)
                    t[blk, :, off, :].view(torch.uint8).copy_(raw)
            self.computed[rid] = self.computed.get(rid, 0) + n
            if end >= req.num_tokens:
                tok = 100 + len(req.all_token_ids) % 800
                sampled[rid] = [tok]
                self.outputs[rid].append(tok)
            else:
                sampled[rid] = []
        return sampled

    def run(self, timeout: float = 60.0, after_schedule: Any = None) -> None:
        """Step until no request is left, transfers included (delayed frees, async loads)."""
        import time

        deadline = time.monotonic() + timeout
        while self.scheduler.requests:
            if time.monotonic() > deadline:
                raise AssertionError(f"requests still pending after {timeout} s: {list(self.scheduler.requests)}")
            out = self.step(after_schedule)
            if not out.num_scheduled_tokens:
                time.sleep(0.002)  # only transfers in flight: let the background threads work

    # ---- inspection -------------------------------------------------------------------------------

    def block_table(self, rid: str) -> list[int]:
        (ids,) = self.scheduler.kv_cache_manager.get_block_ids(rid)
        return list(ids)

    def token_kv(self, block_ids: list[int], n_tokens: int) -> torch.Tensor:
        """Bytes of the first ``n_tokens`` tokens held in ``block_ids``: [tokens, layers, heads, bytes]."""
        rows = []
        for pos in range(n_tokens):
            blk, off = block_ids[pos // self.block_size], pos % self.block_size
            rows.append(torch.stack([self.kv_caches[n][blk, :, off, :].contiguous().view(torch.uint8)
                                     for n in LAYER_NAMES]))
        return torch.stack(rows)

    def close(self) -> None:
        from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

        ensure_kv_transfer_shutdown()
        if self.connector is not None:
            self.connector.shutdown()
        if getattr(self.scheduler, "kv_event_publisher", None) is not None:
            self.scheduler.kv_event_publisher.shutdown()


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one engine in this process as a JSON spec says; return what the test checks."""
    cfg = make_vllm_config(spec["model"], kv_transfer(spec["store"], **spec.get("extra", {})),
                           block_size=spec.get("block_size", 16))
    eng = Engine(cfg, seed=spec.get("seed", 1))
    try:
        result: dict[str, Any] = {"requests": {}}
        for r in spec["requests"]:
            eng.add(r["id"], r["prompt"], r.get("max_tokens", 1))
            eng.run()
            n, start = eng.first_sched[r["id"]]
            result["requests"][r["id"]] = {"scheduled": n, "start": start, "computed": eng.computed[r["id"]],
                                           "output": eng.outputs[r["id"]]}
            if r.get("dump_kv"):
                torch.save(eng.token_kv(eng.tables[r["id"]], r["dump_tokens"]), r["dump_kv"])
        result["stats"] = dict(eng.connector._scheduler.stats)
        return result
    finally:
        eng.close()


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    print("RESULT " + json.dumps(run_spec(spec)), flush=True)

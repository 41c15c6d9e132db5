import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from vua_nixl import InvalidInputError, KVLayout, Namespace
from vua_nixl.keys import as_token_array, chunk_keys

L = KVLayout(2, 2, 8)


def keys(ns: Namespace, tokens, chunk=16):
    return chunk_keys(ns.fingerprint(chunk), as_token_array(tokens), chunk)


def test_chain_is_prefix_addressed():
    ns = Namespace("m", "bf16", L)
    a = list(range(64))
    b = list(range(32)) + [999] * 32
    ka, kb = keys(ns, a), keys(ns, b)
    assert ka[:2] == kb[:2] and ka[2] != kb[2] and ka[3] != kb[3]
    # the same chunk tokens after a different prefix get a different key
    c = [7] * 16 + list(range(16, 32))
    assert keys(ns, c)[1] != ka[1]
    assert len(keys(ns, list(range(47)))) == 2  # only full chunks


@pytest.mark.parametrize(
    "other",
    [
        dict(model="m2"), dict(dtype="fp16"), dict(layout=KVLayout(3, 2, 8)), dict(layout=KVLayout(2, 1, 8)),
        dict(layout=KVLayout(2, 2, 16)), dict(tp_size=2, tp_rank=1), dict(pp_size=2, pp_rank=1),
        dict(revision="r2"), dict(tenant="acme"),
    ],
)
def test_every_namespace_field_changes_every_key(other):
    base = dict(model="m", dtype="bf16", layout=L)
    ka = keys(Namespace(**base), range(64))
    kb = keys(Namespace(**{**base, **other}), range(64))
    assert not set(ka) & set(kb)


def test_chunk_size_is_part_of_the_namespace():
    ns = Namespace("m", "bf16", L)
    assert ns.fingerprint(16) != ns.fingerprint(32)


def test_keys_are_identical_across_processes_and_hash_seeds():
    code = (
        "from vua_nixl.keys import *; import sys;"
        "ns=Namespace('m','bf16',KVLayout(2,2,8),tenant='t');"
        "print(','.join(k.hex() for k in chunk_keys(ns.fingerprint(16), as_token_array(list(range(100))), 16)))"
    )
    outs = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    here = ",".join(k.hex() for k in keys(Namespace("m", "bf16", L, tenant="t"), range(100))) + "\n"
    assert outs == {here}


def test_token_forms_agree():
    ns = Namespace("m", "bf16", L)
    ref = keys(ns, list(range(40)))
    assert keys(ns, np.arange(40, dtype=np.int32)) == ref
    assert keys(ns, torch.arange(40)) == ref
    assert keys(ns, np.arange(40, dtype=np.uint16)) == ref


@pytest.mark.parametrize(
    "bad, msg",
    [
        (torch.tensor([1.0, 2.0]), "tokens must be integers"),
        (np.array([1.5]), "tokens must be integers"),
        ([1, -2, 3], "non-negative"),
        (np.zeros((2, 3), dtype=np.int64), "1-D"),
        (torch.tensor([True, False]), "integers"),
        (["a", "b"], "integers"),
    ],
)
def test_bad_tokens(bad, msg):
    with pytest.raises(InvalidInputError, match=msg):
        as_token_array(bad)


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(model="", dtype="bf16", layout=L), "model"),
        (dict(model="m", dtype="float64", layout=L), "unsupported KV dtype"),
        (dict(model="m", dtype="bf16", layout=L, tp_size=2, tp_rank=2), "tp_rank"),
    ],
)
def test_bad_namespace(kwargs, msg):
    with pytest.raises(InvalidInputError, match=msg):
        Namespace(**kwargs)


def test_bad_layout():
    with pytest.raises(InvalidInputError, match="num_layers"):
        KVLayout(0, 2, 8)
    with pytest.raises(InvalidInputError, match="mla=True"):
        KVLayout(2, 2, 8, mla=True)

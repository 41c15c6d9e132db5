"""Deterministic synthetic English for the offline tokenizer and the demo workload.

The preset models have random weights, so what the text says does not matter; what matters is
that it tokenizes like prose (a few characters per token), that every run and every machine
produces the same tokens, and that nothing has to be downloaded.
"""

from __future__ import annotations

import random

WORDS: tuple[str, ...] = tuple(
    """
    the a of to and in is for on that with as by at from this be are it or an was which not have
    can if its we you they our their will may must should would could when where while after before
    during because so but also only all any some each every many more most less few other such same
    data cache model token tokens layer layers store shared prefix block blocks chunk chunks file files
    read write reads writes node nodes request requests latency memory storage attention key keys
    value values head heads query queries transformer prompt prompts context document documents
    question questions answer answers chat user users assistant system turn turns history server
    servers cluster network bandwidth throughput disk flash page tier engine decode prefill batch
    sequence sequences length time first second fast slow large small hit miss reuse reused compute
    computed recompute saved loaded load save copy transfer gpu cpu host device buffer buffers
    register registered backend posix direct aligned checksum header payload version namespace
    tenant model dtype rank parallel tensor tensors kernel kernels stream streams queue queues
    policy eviction capacity quota limit limits budget report reports metric metrics counter
    customer customers contract invoice payment account accounts region regions service services
    deployment release releases incident incidents team teams project projects quarter revenue
    growth cost costs price prices product products feature features support ticket tickets
    """.split()
)

_PUNCT = (".", ".", ".", ",", ";", "?")


def sentence(rng: random.Random, min_words: int = 6, max_words: int = 18) -> str:
    """One pseudo-English sentence drawn from ``rng``."""
    n = rng.randint(min_words, max_words)
    words = [rng.choice(WORDS) for _ in range(n)]
    if rng.random() < 0.25:
        words.insert(rng.randrange(len(words)), str(rng.randint(1, 99999)))
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice(_PUNCT)


def paragraph(rng: random.Random, sentences: int = 5) -> str:
    return " ".join(sentence(rng) for _ in range(sentences))


def document(seed: int, paragraphs: int) -> str:
    """A reproducible multi-paragraph document (same seed, same text, everywhere)."""
    rng = random.Random(seed)
    title = " ".join(rng.choice(WORDS) for _ in range(4)).title()
    body = "\n\n".join(paragraph(rng, rng.randint(4, 7)) for _ in range(paragraphs))
    return f"# {title}\n\n{body}\n"


def training_corpus(seed: int = 1234, lines: int = 3000) -> list[str]:
    """Text the offline BPE tokenizer is trained on."""
    rng = random.Random(seed)
    return [paragraph(rng, 3) for _ in range(lines)]

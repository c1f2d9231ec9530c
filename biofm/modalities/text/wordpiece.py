"""Deterministic WordPiece vocabulary learning: BPE merges with the ## continuation prefix, as the
`tokenizers` WordPieceTrainer does, but with ties between equally frequent pairs broken by the symbols
themselves (the trainer of `tokenizers` breaks them by ids that vary from run to run), so the same texts
always give the same vocabulary and preparing the same data twice gives the same store."""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict


def learn_vocabulary(word_counts: Counter, vocab_size: int, min_frequency: int, specials: list[str]) -> list[str]:
    """Special tokens, the alphabet (first characters, and ##-prefixed inner ones), then merged symbols,
    most frequent pair first (ties: the smallest pair), until `vocab_size` tokens or no pair occurs
    `min_frequency` times."""
    words = [([w[0]] + ["##" + c for c in w[1:]], n) for w, n in sorted(word_counts.items()) if w]
    alphabet = {s for symbols, _ in words for s in symbols} - set(specials)
    vocab = list(specials) + sorted(alphabet)
    seen = set(vocab)
    pairs: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, (symbols, n) in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pairs[pair] += n
            where[pair].add(i)
    heap = [(-n, a, b) for (a, b), n in pairs.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        negative, a, b = heapq.heappop(heap)
        if pairs.get((a, b), 0) != -negative:  # stale: its current count was pushed when it changed
            continue
        count = -negative
        if count < min_frequency:
            break
        merged = a + (b[2:] if b.startswith("##") else b)
        if merged not in seen:
            seen.add(merged)
            vocab.append(merged)
        changed: Counter = Counter()
        for i in sorted(where.pop((a, b), ())):
            symbols, n = words[i]
            for pair in zip(symbols, symbols[1:]):
                changed[pair] -= n
            out, j = [], 0
            while j < len(symbols):
                if j + 1 < len(symbols) and symbols[j] == a and symbols[j + 1] == b:
                    out.append(merged)
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            words[i] = (out, n)
            for pair in zip(out, out[1:]):
                changed[pair] += n
                where[pair].add(i)
        pairs.pop((a, b), None)
        for pair, delta in changed.items():
            if pair == (a, b) or delta == 0:
                continue
            pairs[pair] += delta
            if pairs[pair] <= 0:
                del pairs[pair]
            else:
                heapq.heappush(heap, (-pairs[pair], *pair))
    return vocab

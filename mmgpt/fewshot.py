"""Few-shot contexts: each query preceded by K solved examples, as one interleaved chat or document.

The solved examples come from the query's own file or from a support file, drawn with a seed that depends only on
the seed and the query, so a query sees the same examples whatever the batch size or order. An example never
shares a record or an image with its query. Records that carry an "episode" (fast-binding episodes) draw only from
their own episode, and there K counts examples per answer (N-way K-shot, as in Frozen); elsewhere K counts examples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from mmgpt.data.eval_records import EvalItem, normalise


@dataclass
class SupportPool:
    """The solved examples a query may draw from: the whole support set, or its own episode."""

    items: list[EvalItem]
    by_episode: dict[str, list[EvalItem]] = field(init=False)

    def __post_init__(self) -> None:
        self.by_episode = {}
        for item in self.items:
            if item.episode is not None:
                self.by_episode.setdefault(item.episode, []).append(item)

    def candidates(self, query: EvalItem) -> list[EvalItem]:
        """Every example but the query itself and any that shows one of the query's images."""
        pool = self.items if query.episode is None else self.by_episode.get(query.episode, [])
        query_images = set(query.images)
        return [item for item in pool if item is not query and not query_images & set(item.images)]


def draw_support(query: EvalItem, pool: SupportPool, shots: int, seed: int) -> list[EvalItem]:
    """The query's K solved examples, in a seeded random order."""
    if shots == 0:
        return []
    rng = random.Random(f"{seed}:{query.where}")
    candidates = pool.candidates(query)
    if query.episode is None:
        if len(candidates) < shots:
            raise ValueError(f"{query.where}: {shots} shots asked, but only {len(candidates)} support examples differ from it")
        chosen = rng.sample(candidates, shots)
    else:
        by_answer: dict[str, list[EvalItem]] = {}
        for item in candidates:
            by_answer.setdefault(normalise(item.answer), []).append(item)
        short = {answer: len(items) for answer, items in by_answer.items() if len(items) < shots}
        if short or normalise(query.answer) not in by_answer:
            raise ValueError(f"{query.where}: episode {query.episode!r} has too few other examples per answer for "
                             f"{shots} shots: {short or {normalise(query.answer): 0}}")
        chosen = [item for answer in sorted(by_answer) for item in rng.sample(by_answer[answer], shots)]
    rng.shuffle(chosen)
    return chosen


def with_shots(query: EvalItem, support: list[EvalItem]) -> EvalItem:
    """The query with its solved examples before it: earlier turns of a chat (system messages stay first), or
    earlier pictures and words of a document."""
    mixed = [item.where for item in support if item.is_document != query.is_document]
    if mixed:
        raise ValueError(f"{query.where}: a {'document' if query.is_document else 'chat'} query cannot take solved "
                         f"examples of the other form ({', '.join(mixed[:3])})")
    if query.is_document:
        prompt = [part for item in support for part in item.solved] + query.prompt
    else:
        system = [m for m in query.prompt if m.get("role") == "system"]
        rest = [m for m in query.prompt if m.get("role") != "system"]
        prompt = system + [m for item in support for m in item.solved if m.get("role") != "system"] + rest
    return replace(query, prompt=prompt)


def few_shot_items(queries: list[EvalItem], support: list[EvalItem], shots: int, seed: int = 0) -> list[EvalItem]:
    pool = SupportPool(support)
    return [with_shots(query, draw_support(query, pool, shots, seed)) for query in queries]

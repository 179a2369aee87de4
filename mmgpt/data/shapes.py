"""A deterministic synthetic world of coloured shapes: images, captions, VQA chats (one or two images) and
interleaved documents.

Each 64x64 image holds 1-4 objects, one per quadrant, with distinct (colour, shape) pairs, so "the red circle",
"left" and "top" are never ambiguous. The same seed always writes the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from mmgpt.data.episodes import copy_drill, held_out_episodes, held_out_sets, training_episode, training_words
from mmgpt.data.scenes import COLOURS, QUADRANTS, SHAPES, ImageWriter, Shape, random_scene

NUMBERS = ("zero", "one", "two", "three", "four")


def caption(scene: list[Shape]) -> str:
    """Objects in reading order (top left first), so each part of the caption is tied to one region."""
    parts = [f"a {item.name} at the {item.place}" for item in sorted(scene, key=lambda item: (item.row, item.column))]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{NUMBERS[len(scene)].capitalize()} shape{'s' if len(scene) > 1 else ''}: {listed}."


def questions(scene: list[Shape], rng: random.Random) -> list[tuple[str, str, str]]:
    """One (kind, question, answer) per question kind that this scene supports."""
    items = []
    shape_counts = {s: sum(item.shape == s for item in scene) for s in SHAPES}
    colour_counts = {c: sum(item.colour == c for item in scene) for c in COLOURS}
    unique_shape = [item for item in scene if shape_counts[item.shape] == 1]
    if unique_shape:
        item = rng.choice(unique_shape)
        items.append(("colour", f"What colour is the {item.shape}?", item.colour))
    unique_colour = [item for item in scene if colour_counts[item.colour] == 1]
    if unique_colour:
        item = rng.choice(unique_colour)
        items.append(("shape", f"What shape is the {item.colour} object?", item.shape))
    if rng.random() < 0.5:
        items.append(("count", "How many shapes are there?", NUMBERS[len(scene)]))
    else:
        shape = rng.choice(SHAPES)
        items.append(("count", f"How many {shape}s are there?", NUMBERS[shape_counts[shape]]))
    present = {(item.colour, item.shape) for item in scene}
    if rng.random() < 0.5:
        colour, shape = rng.choice(sorted(present))
        answer = "yes"
    else:
        colour, shape = rng.choice(sorted({(c, s) for c in COLOURS for s in SHAPES} - present))
        answer = "no"
    items.append(("presence", f"Is there a {colour} {shape}?", answer))
    item = rng.choice(scene)
    if rng.random() < 0.5:
        items.append(("position", f"Is the {item.name} on the left or the right?", ("left", "right")[item.column]))
    else:
        items.append(("position", f"Is the {item.name} at the top or the bottom?", ("top", "bottom")[item.row]))
    return items


PAIR_KINDS = ("more", "same colour")


def pair_question(rng: random.Random, kind: str | None = None) -> tuple[list[list[Shape]], str, str]:
    """(two scenes, question, answer) for a question that needs both images; answers are balanced."""
    kind = kind or rng.choice(PAIR_KINDS)
    if kind == "more":
        fewer, more = sorted(rng.sample(range(1, 5), 2))
        first_has_more = rng.random() < 0.5
        counts = (more, fewer) if first_has_more else (fewer, more)
        scenes = [random_scene(rng, count) for count in counts]
        answer = "first" if first_has_more else "second"
        return scenes, "Which image has more shapes, the first or the second?", answer
    first = random_scene(rng, 1)
    same = rng.random() < 0.5
    colour = first[0].colour if same else rng.choice([c for c in COLOURS if c != first[0].colour])
    second = [Shape(colour, rng.choice(SHAPES), *rng.choice(QUADRANTS))]
    return [first, second], "Are the two shapes the same colour?", "yes" if same else "no"


def _vqa_chat(writer: ImageWriter, rng: random.Random, max_questions: int) -> dict:
    scene = random_scene(rng)
    image = writer.image(scene)
    asked = questions(scene, rng)
    rng.shuffle(asked)
    messages = []
    for index, (_, question, answer) in enumerate(asked[:max_questions]):
        content = [{"type": "image", "image": image}] if index == 0 else []
        messages.append({"role": "user", "content": content + [{"type": "text", "text": question}]})
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def _pair_chat(writer: ImageWriter, rng: random.Random, kind: str | None = None) -> dict:
    scenes, question, answer = pair_question(rng, kind)
    content = [{"type": "image", "image": writer.image(scene)} for scene in scenes]
    messages = [{"role": "user", "content": content + [{"type": "text", "text": question}]},
                {"role": "assistant", "content": answer}]
    return {"messages": messages}


def _caption_doc(writer: ImageWriter, rng: random.Random) -> dict:
    scene = random_scene(rng)
    return {"content": [{"type": "image", "image": writer.image(scene)}, {"type": "text", "text": caption(scene)}]}


def _interleaved_doc(writer: ImageWriter, rng: random.Random) -> dict:
    content = [{"type": "text", "text": "A page of pictures."}]
    for index in range(rng.randint(2, 3)):
        scene = random_scene(rng)
        content.append({"type": "text", "text": f" Picture {index + 1}:"})
        content.append({"type": "image", "image": writer.image(scene)})
        content.append({"type": "text", "text": caption(scene)})
    return {"content": content}


def write_shapes(out: str | Path, seed: int = 0, train: int = 8000, eval: int = 500, episodes: int = 0,
                 eval_episodes: int = 0, ways: int = 2, per_way: int = 5, episode_words: str = "syllables",
                 copy_drills: int = 0, episode_ways: tuple[int, ...] = (), system_rules: int = 0,
                 rules_eval: int = 650, rules_prompts: int = 1300, tools: int = 0,
                 tool: str = "zoom") -> list[Path]:
    """Write `out/train.jsonl` (VQA chats, captions, interleaved documents, plus `episodes` fast-binding episodes
    whose words are drawn as `episode_words` says) and `out/eval.jsonl` (one question each, balanced over the
    question kinds, two-image questions included), plus `copy_drills` plain-text copying drills
    (`mmgpt.data.episodes.copy_drill`). Each training episode has `ways` categories, or as many as one of
    `episode_ways` drawn for it says (many ways make choosing by picture pay more than guessing). With
    `eval_episodes`, also the held-out episode sets (`mmgpt.data.episodes.held_out_sets`:
    `out/episodes-eval*.jsonl`), `eval_episodes` episodes each, `per_way` records per category, for few-shot
    evaluation. With `system_rules`, that many chats under a system rule (`mmgpt.data.rules`) join the training
    records, and `out/rules-eval.jsonl` (`rules_eval` questions in held-out attack phrasings and code words) and
    `out/rules-prompts.jsonl` (`rules_prompts` questions in training phrasings and code words, for `mmgpt data
    pairs`) are written. With `tools`, that many chats offering `tool` (`zoom` or `find_regions`:
    `mmgpt.data.tool_chats`) join the training records."""
    for count in (ways, *episode_ways):
        if not 2 <= count <= len(COLOURS):
            raise ValueError(f"ways must be between 2 and {len(COLOURS)} (one colour a category), got {count}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    writer = ImageWriter(out, "train", rng)
    train_records = []
    for _ in range(train):
        roll = rng.random()
        if roll < 0.45:
            train_records.append(_vqa_chat(writer, rng, max_questions=5))
        elif roll < 0.55:
            train_records.append(_pair_chat(writer, rng))
        elif roll < 0.9:
            train_records.append(_caption_doc(writer, rng))
        else:
            train_records.append(_interleaved_doc(writer, rng))
    eval_rng = random.Random(f"eval-{seed}")
    eval_writer = ImageWriter(out, "eval", eval_rng)
    kinds = ("colour", "shape", "count", "presence", "position", *PAIR_KINDS)
    eval_records = []
    while len(eval_records) < eval:
        wanted = kinds[len(eval_records) % len(kinds)]
        if wanted in PAIR_KINDS:
            eval_records.append(dict(_pair_chat(eval_writer, eval_rng, wanted), kind=wanted))
            continue
        scene = random_scene(eval_rng)
        found = [q for q in questions(scene, eval_rng) if q[0] == wanted]
        if not found:
            continue
        _, question, answer = found[0]
        image = eval_writer.image(scene)
        eval_records.append(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": answer},
                ],
                "kind": wanted,
            }
        )
    episode_draw = training_words(episode_words)
    train_ways = episode_ways or (ways,)
    train_records += [training_episode(writer, rng, episode_draw(rng), rng.choice(train_ways)) for _ in range(episodes)]
    train_records += [copy_drill(rng) for _ in range(copy_drills)]
    from mmgpt.data.rules import rule_chats, rule_questions  # rules build on this module's questions

    train_records += rule_chats(writer, rng, system_rules)
    if tools:
        from mmgpt.data.tool_chats import tool_chats  # tool chats build on this module's questions

        train_records += tool_chats(writer, rng, tools, tool)
    rng.shuffle(train_records)
    written = {"train.jsonl": train_records, "eval.jsonl": eval_records}
    if system_rules:
        for name, count, held_out in (("rules-eval", rules_eval, True), ("rules-prompts", rules_prompts, False)):
            rules_writer = ImageWriter(out, name, random.Random(f"{name}-{seed}"))
            written[f"{name}.jsonl"] = rule_questions(rules_writer, rules_writer.rng, count, held_out)
    if eval_episodes:
        for name, kinds in held_out_sets(ways).items():
            stem = name.removesuffix(".jsonl")
            episode_writer = ImageWriter(out, stem, random.Random(f"{stem}-{seed}"))
            written[name] = held_out_episodes(episode_writer, episode_writer.rng, kinds, eval_episodes, per_way)
    for name, records in written.items():
        (out / name).write_text("".join(json.dumps(record) + "\n" for record in records))
    return [out / name for name in written]

"""`MMGPT.chat` keeps each conversation's KV cache: a follow-up turn reads only its new tokens and encodes only its
new images, and answers exactly as if it had read everything."""

import pytest
import torch
from PIL import Image

from conftest import TINY_LFM2, tiny_config
from mmgpt import MMGPT
from mmgpt.build import build


def picture(colour, size=32):
    return {"type": "image", "image": Image.new("RGB", (size, size), colour)}


def user(text, *colours):
    return {"role": "user", "content": [*(picture(colour) for colour in colours), {"type": "text", "text": text}]}


class Reads:
    """What the model reads per forward call: images encoded and decoder positions."""

    def __init__(self, model):
        self.images, self.positions = [], []
        model.vision.register_forward_hook(lambda module, args, output: self.images.append(args[0].shape[0]))
        model.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: self.positions.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)

    def clear(self):
        self.images.clear()
        self.positions.clear()


@pytest.fixture()
def api(tiny):
    processor, model = tiny
    return MMGPT(model, processor)


def conversation(api, cache, turns=3, max_new_tokens=10):
    """Three turns, each adding a user message (some with new pictures) to the history and the reply."""
    messages = [{"role": "system", "content": "Answer about the pictures."},
                user("What is in the two pictures?", (255, 0, 0), (0, 0, 255))]
    answers = []
    follow_ups = [user("And this one?", (0, 255, 0)), user("Which was first?")]
    for turn in range(turns):
        answers.append(api.chat(messages, max_new_tokens=max_new_tokens, cache=cache))
        if turn < turns - 1:
            messages = messages + [{"role": "assistant", "content": answers[-1]}, follow_ups[turn]]
    return answers, messages


def test_a_follow_up_reads_only_its_new_tokens_and_images_and_answers_the_same(api):
    reads = Reads(api.model)
    uncached, messages = conversation(api, cache=False)
    full_prompt = len(api.prompt(messages, 10).ids)
    assert reads.images == [2, 3, 3]  # without the cache every turn encodes every picture again
    assert [n for n in reads.positions if n > 1][-1] == full_prompt  # and reads the whole history
    reads.clear()
    cached, _ = conversation(api, cache=True)
    assert cached == uncached
    prefills = [n for n in reads.positions if n > 1]
    assert reads.images == [2, 1]  # turn 1 encodes its two pictures, turn 2 the new one, turn 3 none
    assert len(prefills) == 3 and prefills[2] < full_prompt / 3  # turn 3 reads its new message, not the history
    assert len(api.prefix_cache) == 1  # one conversation, one entry: each turn's cache extends the last


def test_the_same_words_with_another_picture_are_read_again(api):
    first = api.chat([user("What colour is it?", (255, 0, 0))], max_new_tokens=8)
    reads = Reads(api.model)
    other = api.chat([user("What colour is it?", (0, 0, 255))], max_new_tokens=8)
    assert reads.images == [1]  # the picture differs, so its slot and everything after it are read again
    assert other == api.chat([user("What colour is it?", (0, 0, 255))], max_new_tokens=8, cache=False)
    assert first == api.chat([user("What colour is it?", (255, 0, 0))], max_new_tokens=8, cache=False)


def test_asking_again_reuses_the_prompt_and_answers_the_same(api):
    messages = [user("Describe the picture.", (10, 200, 30))]
    first = api.chat(messages, max_new_tokens=12)
    reads = Reads(api.model)
    again = api.chat(messages, max_new_tokens=12)
    assert again == first
    assert reads.images == [] and reads.positions[0] == 1  # the cached answer is cut back to the prompt


def test_the_cache_stays_within_its_bound(tiny):
    processor, model = tiny
    one = MMGPT(model, processor)
    one.chat([user("How many?", (1, 2, 3))], max_new_tokens=4)
    size = one.prefix_cache.bytes
    bounded = MMGPT(model, processor, cache_bytes=int(size * 2.5))
    for index in range(5):
        bounded.chat([user(f"How many now, {index}?", (index, 2, 3))], max_new_tokens=4)
        assert bounded.prefix_cache.bytes <= int(size * 2.5)
    assert len(bounded.prefix_cache) == 2
    off = MMGPT(model, processor, cache_bytes=0)
    off.chat([user("How many?", (1, 2, 3))], max_new_tokens=4)
    assert len(off.prefix_cache) == 0


def test_a_convolutional_decoder_continues_its_conversation(shapes_dir, tmp_path):
    """LFM2's convolution states cannot be cut back, so only an exact prefix is reused: a one-token answer leaves
    a cache of exactly the prompt, which the next turn extends."""
    torch.manual_seed(0)
    processor, model = build(tiny_config(shapes_dir, tmp_path, TINY_LFM2).model, ["a red circle"] * 20)
    api = MMGPT(model.eval(), processor)
    first = [user("What is in the two pictures?", (255, 0, 0), (0, 0, 255))]
    api.chat(first, max_new_tokens=1)
    follow_up = first + [{"role": "assistant", "content": "a red circle"}, user("And this one?", (0, 255, 0))]
    reads = Reads(api.model)
    assert api.chat(follow_up, max_new_tokens=8) == api.chat(follow_up, max_new_tokens=8, cache=False)
    assert reads.images == [1, 3]  # with the cache only the new picture is encoded
    asked_again = api.chat(follow_up, max_new_tokens=8)  # would need a cut: read afresh, the same answer
    assert asked_again == api.chat(follow_up, max_new_tokens=8, cache=False)


def test_a_missing_picture_is_a_clear_error(api, tmp_path):
    with pytest.raises(ValueError, match="gone.png': file not found"):
        api.chat([{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "gone.png")},
                                               {"type": "text", "text": "What is it?"}]}], max_new_tokens=4)

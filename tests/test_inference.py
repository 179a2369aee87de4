import threading

import pytest
import torch
from PIL import Image

from mmgpt import MMGPT
from mmgpt.inference import ContextTooLongError


@pytest.fixture(scope="module")
def api(tiny):
    processor, model = tiny
    return MMGPT(model, processor)


def ask(text, colour=(255, 0, 0)):
    return {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (32, 32), colour)},
                                        {"type": "text", "text": text}]}


def test_streamed_pieces_join_to_the_plain_answer(api):
    messages = [ask("What colour is the circle?")]
    pieces = list(api.chat(messages, max_new_tokens=10, stream=True))
    assert "".join(pieces).strip() == api.chat(messages, max_new_tokens=10)


def test_image_item_may_be_a_path(api, tmp_path):
    Image.new("RGB", (32, 32), (0, 255, 0)).save(tmp_path / "green.png")
    by_path = api.chat([{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "green.png")},
                                                     {"type": "text", "text": "hi"}]}], max_new_tokens=6)
    by_image = api.chat([ask("hi", (0, 255, 0))], max_new_tokens=6)
    assert by_path == by_image


def test_sampling_is_seeded_by_torch(api):
    answers = []
    for _ in range(2):
        torch.manual_seed(3)
        answers.append(api.chat([ask("hi")], max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9))
    assert answers[0] == answers[1]


def test_long_history_drops_whole_oldest_exchanges(api):
    history = []
    for turn in range(30):
        history += [ask(f"question number {turn} about this picture"), {"role": "assistant", "content": "red"}]
    messages = [{"role": "system", "content": "Be brief."}] + history + [ask("last question")]
    kept, dropped = api.fit_to_context(messages, max_new_tokens=16)
    assert dropped > 0 and dropped % 2 == 0  # whole user + assistant pairs
    assert kept[0]["role"] == "system" and kept[-1] == messages[-1]
    assert kept[1:] == messages[1 + dropped :]
    assert len(api.encode_prompt(kept, 16).input_ids) <= api.context_length - 16
    assert isinstance(api.chat(messages, max_new_tokens=4), str)


def test_prompt_that_cannot_fit_is_a_clear_error(api):
    with pytest.raises(ContextTooLongError, match=r"prompt is \d+ tokens .* the limit is \d+"):
        api.chat([ask("word " * 400)], max_new_tokens=8)


def test_one_model_shared_by_eight_threads_answers_each_correctly(api):
    questions = [[ask(f"question {i}", ((37 * i) % 256, 0, 0))] for i in range(8)]
    expected = [api.chat(q, max_new_tokens=6) for q in questions]
    results = [None] * 8

    def worker(index):
        results[index] = api.chat(questions[index], max_new_tokens=6)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == expected

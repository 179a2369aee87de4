import threading

import pytest
import torch
from PIL import Image

from conftest import TINY_LFM2, tiny_config
from mmgpt import MMGPT
from mmgpt.build import build
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
    prompt = api.prompt(messages, max_new_tokens=16)
    assert prompt.dropped > 0 and prompt.dropped % 2 == 0  # whole user + assistant pairs
    kept = messages[:1] + messages[1 + prompt.dropped :]  # the system message stays, the oldest exchanges go
    assert prompt.ids == api.prompt(kept, 16, fit=False).ids
    assert len(prompt.ids) <= api.context_length - 16
    with pytest.raises(ContextTooLongError):  # a prepared prompt is checked again against the new answer's room
        api.chat(prompt, max_new_tokens=api.context_length - len(prompt.ids) + 1)
    with pytest.raises(ContextTooLongError):  # the fewest dropped: one exchange more does not fit
        api.prompt(messages[:1] + messages[1 + prompt.dropped - 2 :], 16, fit=False)
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


def picture(colour):
    return {"type": "image", "image": Image.new("RGB", (32, 32), colour)}


def test_documents_are_continued_in_a_batch_as_one_by_one(api):
    documents = [[picture((255, 0, 0)), {"type": "text", "text": "a red circle"}, picture((0, 0, 255))],
                 [{"type": "text", "text": "A page of pictures. Picture 1:"}, picture((0, 255, 0))]]
    alone = [api.complete([document], max_new_tokens=6)[0] for document in documents]
    assert api.complete(documents, max_new_tokens=6) == alone


def test_a_document_to_continue_is_left_open_and_never_cut(api):
    document = [{"type": "text", "text": "two words"}, picture((0, 0, 0))]
    prompt = api.prompt(document, max_new_tokens=4, document=True)
    assert prompt.ids[-1] == api.processor.special.image_end and len(prompt.images) == 1
    assert api.processor.special.eos not in prompt.ids
    with pytest.raises(ContextTooLongError, match=r"prompt is \d+ tokens"):
        api.complete([[{"type": "text", "text": "word " * 400}]], max_new_tokens=4)
    with pytest.raises(ValueError, match="non-empty list"):
        api.complete([[]])


def test_a_convolutional_decoder_continues_left_padded_batches_as_one_by_one(shapes_dir, tmp_path):
    """The tiny-icl recipe's decoder layout (LFM2: a short convolution before the attention layer): padding on the
    left must not leak into the convolutions, so a batch answers as each document alone."""
    torch.manual_seed(0)
    config = tiny_config(shapes_dir, tmp_path, TINY_LFM2)
    processor, model = build(config.model, ["a red circle", "two blue squares"] * 20)
    model.save_pretrained(tmp_path / "lfm2")
    processor.save_pretrained(tmp_path / "lfm2")
    api = MMGPT.from_pretrained(tmp_path / "lfm2", device="cpu")
    assert type(api.model.language_model).__name__ == "Lfm2ForCausalLM"
    documents = [[picture((255, 0, 0)), {"type": "text", "text": "a red circle"}, picture((0, 0, 255))],
                 [picture((0, 255, 0))]]
    alone = [api.complete([document], max_new_tokens=6)[0] for document in documents]
    assert api.complete(documents, max_new_tokens=6) == alone
    assert api.generate([[ask("hi")], [ask("what is this picture about?")]], max_new_tokens=5) == [
        api.chat([ask("hi")], max_new_tokens=5), api.chat([ask("what is this picture about?")], max_new_tokens=5)]


@pytest.mark.parametrize("call, message", [
    (lambda api: api.chat("hello"), r"got the string 'hello': pass \[\{'role': 'user', 'content': 'hello'\}\]"),
    (lambda api: api.chat([]), "messages must be a non-empty list"),
    (lambda api: api.chat(["hello"]), "message 0 must be a {'role'"),
    (lambda api: api.generate([]), "conversations must be a non-empty list"),
    (lambda api: api.complete([]), "documents must be a non-empty list"),
    (lambda api: api.chat([ask("hi")], max_new_tokens="8"), "max_new_tokens must be a whole number of at least 1, got '8'"),
    (lambda api: api.chat([ask("hi")], max_new_tokens=0), "max_new_tokens must be a whole number of at least 1, got 0"),
    (lambda api: api.chat([ask("hi")], stream=True, max_new_tokens=2.5), "max_new_tokens .* got 2.5"),
    (lambda api: api.chat([ask("hi")], do_sample=True, top_p=0), r"top_p must be a number in \(0, 1\], got 0"),
    (lambda api: api.generate([[ask("hi")]], top_p=1.5), r"top_p must be a number in \(0, 1\], got 1.5"),
    (lambda api: api.chat([ask("hi")], do_sample=True, temperature=0), "sampling needs a temperature above 0"),
    (lambda api: api.chat([ask("hi")], temperature=-1), "temperature must be a number, 0 or more, got -1"),
    (lambda api: api.chat([ask("a \ud800 b")]), r"holds '\\ud800' at character 2, half of a UTF-16 pair"),
])
def test_bad_arguments_are_one_error_naming_the_value(api, call, message):
    with pytest.raises(ValueError, match=message):
        call(api)

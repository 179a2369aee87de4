"""Benchmark harnesses driving mmgpt: `lmms-eval --model mmgpt` on a local task built from the shapes eval set,
offline, and VLMEvalKit's model interface; their answers and scores are the ones mmgpt's own API gives for the same
images and questions."""

import glob
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from mmgpt import MMGPT
from mmgpt.train import train

from conftest import tiny_config

pytest.importorskip("lmms_eval")

COLOURS = ["red", "green", "blue", "yellow", "purple"]
UTILS = '''from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]
'''


def task_folder(folder, docs):
    (folder / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (folder / "utils.py").write_text(UTILS)
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
              "test_split: test\ndoc_to_visual: !function utils.doc_to_visual\ndoc_to_text: !function utils.doc_to_text\n")
    (folder / "answer.yaml").write_text(
        "task: mmgpt_shapes_answer\n" + common + "output_type: generate_until\ndoc_to_target: answer\n"
        "generation_kwargs:\n  max_new_tokens: 8\n  until: [\"\\n\"]\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")


@pytest.fixture(scope="module")
def task(shapes_dir, tmp_path_factory):
    """A tiny model, and a local task of the shapes eval's one-image colour questions."""
    folder = tmp_path_factory.mktemp("task")
    model_dir = train(tiny_config(shapes_dir, folder / "run", "train.max_steps=40", "train.lr=3e-3", "data.eval=")).final_dir
    docs = []
    for line in (shapes_dir / "eval.jsonl").read_text().splitlines():
        record = json.loads(line)
        user, answer = record["messages"][0]["content"], record["messages"][1]["content"]
        image = next(item["image"] for item in user if item["type"] == "image")
        question = next(item["text"] for item in user if item["type"] == "text")
        if answer in COLOURS and sum(item["type"] == "image" for item in user) == 1:
            docs.append({"image": str(shapes_dir / image), "question": question, "answer": answer, "choices": COLOURS})
    assert len(docs) >= 2
    task_folder(folder, docs)
    return model_dir, docs, folder


def conversation(doc):
    return [{"role": "user", "content": [{"type": "image", "image": Image.open(doc["image"]).convert("RGB")},
                                         {"type": "text", "text": doc["question"]}]}]


@pytest.mark.slow
def test_lmms_eval_runs_mmgpt_on_a_local_task_as_mmgpt_itself_answers(task, tmp_path):
    model_dir, docs, folder = task
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lmms_eval", "--model", "mmgpt", "--model_args", f"pretrained={model_dir},device=cpu",
               "--tasks", "mmgpt_shapes_answer", "--include_path", str(folder), "--batch_size", "2",
               "--output_path", str(tmp_path / "out"), "--log_samples"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0 and "Error during evaluation" not in result.stderr, result.stderr[-3000:]
    [path] = glob.glob(str(tmp_path / "out" / "**" / "*samples_mmgpt_shapes_answer.jsonl"), recursive=True)
    logged = sorted((json.loads(line) for line in open(path)), key=lambda sample: sample["doc_id"])
    model = MMGPT.from_pretrained(model_dir, device="cpu")
    answers = [answer.split("\n")[0] for answer in model.generate([conversation(doc) for doc in docs], max_new_tokens=8)]
    assert [sample["filtered_resps"] for sample in logged] == answers
    assert [sample["input_media"] for sample in logged] == [[doc["image"]] for doc in docs]


def test_loglikelihood_requests_score_each_choice_as_the_assistants_reply(task):
    from lmms_eval.api.instance import Instance

    from mmgpt.integrations.lmms_eval import MMGPTLmms

    model_dir, docs, _ = task
    adapter = MMGPTLmms(pretrained=str(model_dir), device="cpu")
    adapter.task_dict = {"shapes": {"test": docs}}

    def visual(doc):
        return [Image.open(doc["image"]).convert("RGB")]

    requests = [Instance("loglikelihood", (doc["question"], f" {choice}", visual, doc_id, "shapes", "test"), index,
                         {"task": "shapes", "doc_id": doc_id, "repeats": 1})
                for doc_id, doc in enumerate(docs) for index, choice in enumerate(COLOURS)]
    scores = adapter.loglikelihood(requests)
    model = MMGPT.from_pretrained(model_dir, device="cpu")
    expected = [model.loglikelihood(conversation(doc), choice) for doc in docs for choice in COLOURS]
    assert [round(score, 4) for score, _ in scores] == [round(score, 4) for score, _ in expected]
    assert all(score < 0 for score, _ in scores) and len({round(s, 3) for s, _ in scores}) > len(COLOURS)
    settings = model._generate_kwargs([model.prompt(conversation(docs[0]), 4)], 4, False, 1.0, 1.0)
    written = model.model.generate(**settings)[0, settings["input_ids"].shape[1] :]
    greedy = model.processor.decode(written)  # as written, its leading space kept (`generate` strips it)
    assert model.loglikelihood(conversation(docs[0]), greedy)[1] is True  # what it writes is what greedy scores


def test_vlmevalkit_model_answers_messages_and_chats_as_mmgpt_does(task):
    from mmgpt.integrations.vlmevalkit import MMGPTVLMEval

    model_dir, docs, _ = task
    adapter = MMGPTVLMEval(str(model_dir), device="cpu", max_new_tokens=8)
    model = MMGPT.from_pretrained(model_dir, device="cpu")
    for doc in docs[:3]:
        message = [{"type": "image", "value": doc["image"]}, {"type": "text", "value": doc["question"]}]
        expected = model.chat([{"role": "user", "content": [{"type": "image", "image": doc["image"]},
                                                            {"type": "text", "text": doc["question"]}]}], max_new_tokens=8)
        assert adapter.generate_inner(message) == expected
    chat = [{"role": "user", "content": [{"type": "image", "value": docs[0]["image"]},
                                         {"type": "text", "value": docs[0]["question"]}]},
            {"role": "assistant", "content": [{"type": "text", "value": "red"}]},
            {"role": "user", "content": [{"type": "text", "value": "And the shape?"}]}]
    assert adapter.chat_inner(chat) == model.chat(
        [{"role": "user", "content": [{"type": "image", "image": docs[0]["image"]},
                                      {"type": "text", "text": docs[0]["question"]}]},
         {"role": "assistant", "content": "red"}, {"role": "user", "content": "And the shape?"}], max_new_tokens=8)
    with pytest.raises(ValueError, match="not 'video'"):
        adapter.generate_inner([{"type": "video", "value": "clip.mp4"}])

"""Preference tuning: the DPO loss by hand, pairs from a model's own samples, and DPO runs (learning, resume)."""

import json
import math
import os
import signal

import pytest
import torch

from mmgpt.cli import main
from mmgpt.config import ConfigError
from mmgpt.data.pairs import read_pairs
from mmgpt.data.records import RecordError
from mmgpt.data.shapes import write_shapes
from mmgpt.build import load_saved
from mmgpt.data.collate import collate
from mmgpt.data.pairs import PairDataset, collate_pairs
from mmgpt.dpo import STATS, dpo_loss, dpo_step, sequence_logprobs
from mmgpt.train import train

from conftest import tiny_config


def test_dpo_loss_matches_the_hand_computed_value():
    loss, chosen, rejected = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]),
                                      torch.tensor([-1.5]), beta=0.5)
    # rewards 0.5 x (-1 + 1.5) = 0.25 and 0.5 x (-2 + 1.5) = -0.25; loss -log sigmoid(0.5) = log(1 + e^-0.5)
    assert chosen.item() == pytest.approx(0.25) and rejected.item() == pytest.approx(-0.25)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.5)))


def test_sequence_logprobs_sum_the_labelled_tokens(tiny):
    processor, model = tiny
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9]])
    labels = torch.tensor([[-100, -100, 7, 8, 9], [-100, -100, -100, -100, 9]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    by_hand = torch.log_softmax(logits[0, :-1], -1)[torch.arange(4), ids[0, 1:]]
    assert sequence_logprobs(logits, labels)[0].item() == pytest.approx(by_hand[1:].sum().item(), rel=1e-5)
    assert sequence_logprobs(logits, labels)[1].item() == pytest.approx(by_hand[3].item(), rel=1e-5)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny model trained a few steps on the shapes world with rules, and pairs sampled from it by the CLI."""
    folder = tmp_path_factory.mktemp("rules")
    write_shapes(folder, seed=4, train=40, eval=8, system_rules=40, rules_eval=13, rules_prompts=40)
    final = train(tiny_config(folder, folder / "sft", "train.max_steps=4")).final_dir
    assert main(["data", "pairs", str(final), "--prompts", str(folder / "rules-prompts.jsonl"), "--out",
                 str(folder / "pairs.jsonl"), "--samples", "2", "--eval-share", "0.25", "--device", "cpu"]) == 0
    return folder, final


def dpo_config(folder, final, output_dir, *overrides):
    return tiny_config(folder, output_dir, "train.objective=dpo", f"model.init_from={final}",
                       f"data.train={folder / 'pairs.jsonl'}", f"data.eval={folder / 'pairs-eval.jsonl'}", *overrides)


def metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_pairs_from_own_samples_choose_the_reference(start):
    folder, _ = start
    pairs, _ = read_pairs(folder / "pairs.jsonl")
    prompts = {json.dumps(json.loads(line)["messages"][:-1]): json.loads(line) for line in
               (folder / "rules-prompts.jsonl").read_text().splitlines()}
    assert len(pairs) > 10 and (folder / "pairs-eval.jsonl").is_file()
    for line in (folder / "pairs.jsonl").read_text().splitlines():
        record = json.loads(line)
        source = prompts[json.dumps(record["messages"])]  # the prompt as written, images relative to the folder
        assert record["chosen"] == source["messages"][-1]["content"] != record["rejected"]


def test_the_sft_term_adds_the_chosen_replys_mean_token_loss(start):
    folder, final = start
    processor, model = load_saved(final)
    model.eval()
    pairs = PairDataset(read_pairs(folder / "pairs.jsonl")[0][:1], processor, 256)
    with torch.no_grad():
        loss, stats = dpo_step(model, model, collate_pairs([pairs[0]], processor.special.pad), beta=0.1, sft_weight=0.5)
        chosen_loss = model(**collate([pairs[0].chosen], processor.special.pad)).loss  # transformers' mean token loss
    assert stats[STATS.index("chosen_nll")].item() == pytest.approx(chosen_loss.item(), rel=1e-4)
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * chosen_loss.item(), rel=1e-4)  # policy = reference


def test_dpo_starts_at_log_2_and_resumes_exactly(start, tmp_path):
    folder, final = start
    overrides = ["train.max_steps=6", "train.save_every=100", "train.eval_every=3"]

    def press_ctrl_c_at_step_3(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    assert train(dpo_config(folder, final, tmp_path / "resumed", *overrides), on_step=press_ctrl_c_at_step_3).step == 3
    resumed = train(dpo_config(folder, final, tmp_path / "resumed", *overrides))
    train(dpo_config(folder, final, tmp_path / "straight", *overrides))
    records = metrics(tmp_path / "resumed")
    steps = [r for r in records if "loss" in r]
    assert [r["loss"] for r in steps] == [r["loss"] for r in metrics(tmp_path / "straight") if "loss" in r]
    assert len(steps) == 6 and steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference
    assert steps[0]["reward_margin"] == pytest.approx(0, abs=1e-5)
    assert {"reward_accuracy", "chosen_logp", "rejected_logp"} <= set(steps[0])
    assert {"eval_loss", "eval_reward_margin", "eval_reward_accuracy"} <= {k for r in records for k in r}
    assert (resumed.final_dir / "model.safetensors").is_file()


def test_dpo_prefers_the_chosen_replies(start, tmp_path):
    folder, final = start
    run = tmp_path / "run"
    train(dpo_config(folder, final, run, "train.max_steps=30", "train.lr=3e-3", "train.eval_every=30"))
    steps = [r for r in metrics(run) if "loss" in r]
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"]
    assert steps[-1]["reward_margin"] > 1 and steps[-1]["reward_accuracy"] > 0.9
    evals = [r for r in metrics(run) if "eval_loss" in r]
    assert evals[-1]["eval_reward_margin"] > 0


def test_dpo_needs_a_starting_model_and_well_formed_pairs(start, tmp_path):
    folder, final = start
    assert main(["data", "pairs", str(final), "--prompts", str(folder / "rules-prompts.jsonl"), "--out",
                 str(tmp_path / "pairs.jsonl"), "--eval-share", "1"]) == 2
    with pytest.raises(ConfigError, match="model.init_from"):
        tiny_config(folder, tmp_path, "train.objective=dpo")
    bad = folder / "bad-pairs.jsonl"
    record = json.loads((folder / "pairs.jsonl").read_text().splitlines()[0])
    bad.write_text(json.dumps(dict(record, rejected=record["chosen"])) + "\n")
    with pytest.raises(RecordError, match="line 1: 'chosen' and 'rejected' are the same"):
        read_pairs(bad)
    bad.write_text(json.dumps({"messages": record["messages"], "chosen": "red"}) + "\n")
    with pytest.raises(RecordError, match="'rejected' must be"):
        read_pairs(bad)

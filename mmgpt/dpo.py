"""Preference tuning (DPO, Rafailov et al. 2023): pairs from a model's own sampled replies, and the loss.

The loss raises the policy's log-probability of the chosen reply against the rejected one, each measured against a
frozen reference (the starting checkpoint):
    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))
where log pi(reply) is the sum over the reply's tokens (its <|end|> included). DPO alone lowers the chosen reply's
likelihood too, only less than the rejected one's (in the tiny rules recipe the chosen log-probability fell from -7
to -15 in 300 steps and replies stopped ending: "I cannot share that that that"); `train.dpo_sft_weight` adds that
weight times the chosen reply's mean next-token loss, as RPO (Pang et al. 2024; TRL's `rpo_alpha`) does. It runs
inside our own training loop (`train.objective: dpo`), so checkpoints, exact resume, many processes and metrics are
those of any run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmgpt.data.eval_records import EvalItem, normalise
from mmgpt.data.rules import score
from mmgpt.inference import MMGPT
from mmgpt.processing import IGNORE_INDEX


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of its labelled tokens (labels shifted as the decoder's loss does)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE_INDEX
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (token_logprobs * mask).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen reward, rejected reward); a reward is beta x the log-ratio of policy to reference."""
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward.detach(), rejected_reward.detach()


STATS = ("loss", "reward_margin", "reward_accuracy", "chosen_logp", "rejected_logp", "chosen_nll")


def dpo_step(model, reference, batch: dict[str, torch.Tensor], beta: float,
             sft_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss of the batch's pairs, summed `STATS` of them) for a `collate_pairs` batch: chosen rows first,
    then rejected. The reference runs without gradients, under the same autocast as the policy's forward."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    policy = sequence_logprobs(model(**inputs).logits, batch["labels"])
    with torch.no_grad():
        reference_logprobs = sequence_logprobs(reference(**inputs).logits, batch["labels"])
    pairs = policy.shape[0] // 2
    losses, chosen_reward, rejected_reward = dpo_loss(policy[:pairs], policy[pairs:], reference_logprobs[:pairs],
                                                      reference_logprobs[pairs:], beta)
    chosen_tokens = (batch["labels"][:pairs, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)
    chosen_nll = -policy[:pairs] / chosen_tokens
    losses = losses + sft_weight * chosen_nll
    margin = chosen_reward - rejected_reward
    stats = torch.stack([losses.detach().sum(), margin.sum(), (margin > 0).float().sum(),
                         policy[:pairs].detach().sum(), policy[pairs:].detach().sum(), chosen_nll.detach().sum()])
    return losses.sum(), stats


def is_mistake(item: EvalItem, reply: str) -> bool:
    """A reply worse than the reference: it breaks the item's rule or answers its picture question wrongly; without
    a rule, any reply that is not the reference answer."""
    if item.rule:
        outcome = score(item.rule, reply, item.answer)
        return not outcome["kept"] or outcome["correct"] is False
    return normalise(reply) != normalise(item.answer)


def sample_pairs(model: MMGPT, items: list[EvalItem], samples: int, temperature: float, batch_size: int,
                 max_new_tokens: int = 32, progress=None) -> tuple[list[dict], int]:
    """Preference records from `samples` sampled replies to each item: chosen is the reference answer, rejected each
    distinct mistaken reply (`is_mistake`). Also returns how many items the model answered well every time (they
    give no pair)."""
    records, clean = [], 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        replies = model.generate([item.prompt for item in chunk for _ in range(samples)],
                                 max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature)
        for index, item in enumerate(chunk):
            mistakes = dict.fromkeys(reply for reply in replies[index * samples : (index + 1) * samples]
                                     if reply.strip() and is_mistake(item, reply))
            clean += not mistakes
            records += [{"messages": item.prompt, "chosen": item.answer, "rejected": reply} for reply in mistakes]
        if progress is not None:
            progress.update(len(chunk))
    return records, clean

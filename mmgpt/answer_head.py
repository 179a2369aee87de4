"""An auxiliary loss with a short path from each answer to the ViT, for a ViT trained from scratch beside a decoder.

Through the decoder alone, a small recipe's ViT learns slowly: its gradient comes back through a decoder that is
itself still learning, and the answer priors are learnt first (README, "Recipes": the conv-stem ViT trained alone
as a shape classifier told clutter's shapes apart at 0.95 in 600 steps; trained beside the decoder, it did no
better than a random one). This head predicts each answer's first token from the question's words and the ViT's
patch features, by attention, with nothing between them and the answer. It trains with the model
(`train.answer_loss_weight`) and is not part of the saved model.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from mmgpt.processing import IGNORE_INDEX

WIDTH = 256
HEADS = 4


def answers_after_pictures(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                           image_token_id: int, num_image_tokens: int) -> tuple[torch.Tensor, ...]:
    """Every answer (a run of labelled tokens) that follows a picture in its row, as (row, picture index in the
    batch's reading order, question mask over the row's positions, first answer token). The question is the row's
    unlabelled text since the previous answer (or the row's start): the user's turn and its chat markup."""
    labelled = labels != IGNORE_INDEX
    starts = labelled & ~F.pad(labelled[:, :-1], (1, 0), value=False)
    upcoming = starts.cumsum(1)  # at an unlabelled position: the index of the answer it leads up to
    rows, columns = starts.nonzero(as_tuple=True)
    slots = input_ids == image_token_id
    pictures_before = slots.cumsum(1)[rows, columns] // num_image_tokens
    first_picture_of_row = F.pad((slots.sum(1) // num_image_tokens).cumsum(0), (1, 0))[:-1]
    keep = pictures_before > 0
    rows, columns = rows[keep], columns[keep]
    picture = first_picture_of_row[rows] + pictures_before[keep] - 1
    words = ~labelled & ~slots & attention_mask.bool()
    answer_index = upcoming[rows, columns] - 1
    question = words[rows] & (upcoming[rows] == answer_index[:, None])
    return rows, picture, question, labels[rows, columns]


class AnswerHead(nn.Module):
    """The question's mean word embedding picks patch features by attention, per head both a softmax pick (one
    object) and a sigmoid-gated mean (how many); an MLP maps what was picked, with the question, to the answer's
    first token."""

    def __init__(self, vision_width: int, vocab_size: int, image_token_id: int, num_image_tokens: int):
        super().__init__()
        self.image_token_id, self.num_image_tokens = image_token_id, num_image_tokens
        self.words = nn.Embedding(vocab_size, WIDTH)
        self.question_norm, self.image_norm = nn.LayerNorm(WIDTH), nn.LayerNorm(vision_width)
        self.query, self.key = nn.Linear(WIDTH, WIDTH), nn.Linear(vision_width, WIDTH)
        self.value = nn.Linear(vision_width, WIDTH)
        self.out = nn.Sequential(nn.Linear(3 * WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, vocab_size))

    def forward(self, image_features: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(The summed cross-entropy of the first token of every answer that follows a picture, their count)."""
        rows, picture, question, first_token = answers_after_pictures(
            input_ids, labels, attention_mask, self.image_token_id, self.num_image_tokens)
        if rows.numel() == 0:  # still a loss over every weight, so that each process's head takes part in the step
            return sum(parameter.sum() for parameter in self.parameters()) * 0.0, 0
        logits = self.answer_logits(image_features, input_ids, rows, picture, question)
        return F.cross_entropy(logits.float(), first_token, reduction="sum"), len(rows)

    def answer_logits(self, image_features: torch.Tensor, input_ids: torch.Tensor, rows: torch.Tensor,
                      picture: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        """Logits of each answer's first token, for the answers `answers_after_pictures` found (at least one)."""
        answer, position = question.nonzero(as_tuple=True)  # each question word once: no copy of a row an answer
        words = self.words(input_ids[rows[answer], position])
        summed = words.new_zeros(len(rows), words.shape[-1]).index_add_(0, answer, words)
        query = self.question_norm(summed / question.sum(1, keepdim=True).clamp(min=1))
        tokens = self.image_norm(image_features)
        pictures, patches = tokens.shape[:2]
        keys = self.key(tokens).view(pictures, patches, HEADS, -1)
        values = self.value(tokens).view(pictures, patches, HEADS, -1)
        # Each picture's questions side by side (picture indices come in order), so that attention is one batched
        # product a picture: the patch features are never copied once an answer.
        per_picture = torch.bincount(picture, minlength=pictures)
        slot = torch.arange(len(picture), device=picture.device) - (per_picture.cumsum(0) - per_picture)[picture]
        queries = keys.new_zeros(pictures, int(per_picture.max()), HEADS, keys.shape[-1])
        queries[picture, slot] = self.query(query).view(-1, HEADS, keys.shape[-1]).to(keys.dtype)
        scores = torch.einsum("pahd,pkhd->pakh", queries, keys) / math.sqrt(keys.shape[-1])
        picked = torch.einsum("pakh,pkhd->pahd", scores.softmax(2), values)[picture, slot].flatten(1)
        counted = torch.einsum("pakh,pkhd->pahd", torch.sigmoid(scores), values)[picture, slot].flatten(1) / patches
        return self.out(torch.cat([picked, counted, query], -1))

"""How much of the answers do a run's ViT features carry, whether or not its decoder reads them?

    python benchmarks/answer_head_reads.py runs/tiny-vqa --data data/clutter/eval.jsonl

A run trained with `train.answer_loss_weight` keeps its answer head in every checkpoint. Here the newest checkpoint's
ViT and head answer the held-out chats by themselves (each answer's first token, greedy), per kind where the records
name one (`"kind"`), beside what `mmgpt eval` gives for the whole model: where the head is right and the model is
not, the picture's information reached the ViT and the decoder did not take it out.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmgpt import checkpoint
from mmgpt.answer_head import AnswerHead, answers_after_pictures
from mmgpt.build import load_saved
from mmgpt.data.collate import collate
from mmgpt.data.dataset import EncodedDataset
from mmgpt.data.formats import read_samples


def head_accuracy(run: Path, data: Path, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """{kind: {"n", "accuracy"}} of the answer head on every answer that follows a picture in `data`, and "all"."""
    folder = checkpoint.latest_checkpoint(run)
    if folder is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint.checkpoints_dir(run)}: train the run first")
    if not (folder / "model_1.safetensors").is_file():
        raise FileNotFoundError(f"{folder} holds no answer head: the run was trained without train.answer_loss_weight")
    processor, model = load_saved(folder)
    model.eval()
    head = AnswerHead(model.vision.width, model.config.text_config.vocab_size, model.config.image_token_id,
                      model.num_image_tokens)
    head.load_state_dict(load_file(folder / "model_1.safetensors"))
    head.eval()
    samples, _ = read_samples(data, "", "", False)
    kinds = [json.loads(line).get("kind", "all") for line in data.read_text().splitlines() if line.strip()]
    encoded = EncodedDataset(samples, processor, model.config.text_config.max_position_embeddings)
    right, total = Counter(), Counter()
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = collate([encoded[index] for index in range(start, min(len(encoded), start + batch_size))],
                            processor.special.pad)
            if batch.get("pixel_values") is None:
                continue
            found = answers_after_pictures(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                           head.image_token_id, head.num_image_tokens)
            rows, picture, question, first_token = found
            if rows.numel() == 0:
                continue
            features = model.vision(batch["pixel_values"])
            guesses = head.answer_logits(features, batch["input_ids"], rows, picture, question).argmax(-1)
            for row, correct in zip(rows.tolist(), (guesses == first_token).tolist()):
                for kind in {kinds[start + row], "all"}:
                    total[kind] += 1
                    right[kind] += correct
    return {kind: {"n": total[kind], "accuracy": right[kind] / total[kind]} for kind in sorted(total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run's output_dir (its checkpoints/ hold the head)")
    parser.add_argument("--data", type=Path, required=True, help="held-out chats, e.g. data/clutter/eval.jsonl")
    args = parser.parse_args()
    print(json.dumps(head_accuracy(args.run, args.data)))


if __name__ == "__main__":
    main()

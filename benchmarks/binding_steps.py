"""How many training steps a small decoder needs before it binds words to pictures in context.

Fast-binding episodes token for token in mmgpt's layouts, with one change: each picture is a perfect one (a learned
projection of its colour and shape, one-hot, plus noise) instead of a ViT's view of a drawing. What is left to learn
is the decoder's part alone: look back for the earlier picture like this one and copy the word that came with it.
The figure that matters is the step at which held-out accuracy on answerable pictures leaves 0.5 (a guess between
the episode's two words) and how fast it climbs; a recipe that cannot bind here cannot bind with real pictures
either, and each step here costs a fraction of a real one.

    python benchmarks/binding_steps.py --layout document --decoder lfm2    # the tiny-icl recipe
    python benchmarks/binding_steps.py --layout document --decoder llama   # the same without convolutions
    python benchmarks/binding_steps.py --layout document --line-break      # a line break after each word
    python benchmarks/binding_steps.py --layout chat --decoder llama       # user: picture, assistant: word
    python benchmarks/binding_steps.py --layout chat --offer --decoder llama  # + the two words offered first
    python benchmarks/binding_steps.py --words strings --stop                 # words of 1-4 random tokens, stopped
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

USER, ASSISTANT, END, NEWLINE, IMAGE_START, IMAGE, IMAGE_END, SYSTEM, SEPARATOR = range(1, 10)
FIRST_SYLLABLE = 10
SYLLABLES, COLOURS, SHAPES = 70, 5, 3
PICTURE_WIDTH = COLOURS + SHAPES


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", choices=("document", "chat"), default="document",
                        help="document: <picture> word <picture> ...; chat: <|user|> <picture> <|end|> <|assistant|> word <|end|>")
    parser.add_argument("--line-break", action="store_true", help="document layout: a line break after each word")
    parser.add_argument("--offer", action="store_true", help="name the episode's two words once, before the pictures")
    parser.add_argument("--words", choices=("syllables", "strings"), default="syllables",
                        help="syllables: two tokens of a fixed vocabulary; strings: 1-4 random tokens, fresh every time")
    parser.add_argument("--stop", action="store_true",
                        help="document layout: a loss on the <|image_start|> after each word (where the word ends)")
    parser.add_argument("--decoder", choices=("lfm2", "llama"), default="lfm2",
                        help="lfm2: short convolutions between attention layers; llama: attention layers only")
    parser.add_argument("--lfm2-layers", default="conv,full_attention",
                        help="the LFM2 layout's layer types, in order")
    parser.add_argument("--bf16", action="store_true", help="train under bf16 autocast")
    parser.add_argument("--picture-scale", type=float, default=1.0, help="multiply every picture by this")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--turns", type=int, default=5, help="pictures per training episode")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class Episodes:
    """2-way episodes: two categories of different colours and shapes, two words (two syllables sharing none, or
    strings of one to four tokens with different first tokens)."""

    def __init__(self, args: argparse.Namespace):
        self.rng = random.Random(args.seed)
        self.args = args
        words = [(a, b) for a in range(SYLLABLES) for b in range(SYLLABLES) if a != b]
        random.Random("words").shuffle(words)
        self.held_out, self.training = words[:800], words[800:]

    def _words(self, vocabulary: list[tuple[int, int]]) -> list[tuple[int, ...]]:
        while True:
            if self.args.words == "strings":
                words = [tuple(self.rng.randrange(SYLLABLES) for _ in range(self.rng.randint(1, 4))) for _ in range(2)]
                told_apart = words[0][0] != words[1][0]
            else:
                words = self.rng.sample(vocabulary, 2)
                told_apart = not set(words[0]) & set(words[1])
            if told_apart:
                return words

    def episode(self, vocabulary: list[tuple[int, int]], turns: int) -> tuple[list[int], list[int], torch.Tensor, list]:
        """(ids, labels, pictures, answerable): `answerable` lists (position, first syllable, both first syllables)
        of every picture whose category was shown before in the episode."""
        colours, shapes = self.rng.sample(range(COLOURS), 2), self.rng.sample(range(SHAPES), 2)
        words = self._words(vocabulary)
        order = [0, 1] + [self.rng.randrange(2) for _ in range(turns - 2)]
        self.rng.shuffle(order)
        ids: list[int] = []
        if self.args.offer:
            ids = [SYSTEM, *self._tokens(words[0]), SEPARATOR, *self._tokens(words[1]), END]
        labels = [-100] * len(ids)
        pictures, answerable, seen = [], [], set()
        chat = self.args.layout == "chat"
        for category in order:
            prompt = [USER, IMAGE_START, IMAGE, IMAGE_END, END, ASSISTANT] if chat else [IMAGE_START, IMAGE, IMAGE_END]
            ends_word = self.args.stop and not chat and bool(seen)
            ids += prompt
            labels += [IMAGE_START if ends_word else -100] + [-100] * (len(prompt) - 1)
            picture = torch.zeros(PICTURE_WIDTH)
            picture[colours[category]] = picture[COLOURS + shapes[category]] = 1
            pictures.append((picture + 0.3 * torch.randn(PICTURE_WIDTH)) * self.args.picture_scale)
            word = self._tokens(words[category])
            if category in seen:
                answerable.append((len(ids) - 1, word[0], [self._tokens(w)[0] for w in words]))
            seen.add(category)
            answer = word + ([END] if chat else [NEWLINE] if self.args.line_break else [])
            ids += answer
            labels += answer
        return ids, labels, torch.stack(pictures), answerable

    @staticmethod
    def _tokens(word: tuple[int, ...]) -> list[int]:
        return [FIRST_SYLLABLE + piece for piece in word]

    def batch(self, vocabulary: list[tuple[int, int]], size: int, turns: int):
        episodes = [self.episode(vocabulary, turns) for _ in range(size)]
        length = max(len(ids) for ids, *_ in episodes)
        ids = torch.zeros(size, length, dtype=torch.long)
        labels = torch.full((size, length), -100)
        for row, (episode_ids, episode_labels, _, _) in enumerate(episodes):
            ids[row, : len(episode_ids)] = torch.tensor(episode_ids)
            labels[row, : len(episode_labels)] = torch.tensor(episode_labels)
        return ids, labels, torch.cat([e[2] for e in episodes]), [e[3] for e in episodes]


def decoder_config(args: argparse.Namespace):
    """Llama layout: two attention layers; LFM2 layout: `--lfm2-layers` (a short convolution over 3 tokens before
    the attention layer, by default)."""
    common = dict(vocab_size=FIRST_SYLLABLE + SYLLABLES, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                  num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=1024,
                  tie_word_embeddings=True)
    if args.decoder == "lfm2":
        layer_types = args.lfm2_layers.split(",")
        return AutoConfig.for_model("lfm2", num_hidden_layers=len(layer_types), conv_L_cache=3,
                                    block_auto_adjust_ff_dim=False, layer_types=layer_types, **common)
    return AutoConfig.for_model("llama", num_hidden_layers=2, hidden_act="gelu", **common)


class Binder(torch.nn.Module):
    """A decoder whose image slots hold projected pictures, as mmgpt's projector places them."""

    def __init__(self, args: argparse.Namespace):
        super().__init__()
        self.decoder = AutoModelForCausalLM.from_config(decoder_config(args), attn_implementation="eager")
        self.projector = torch.nn.Linear(PICTURE_WIDTH, args.hidden)

    def forward(self, ids: torch.Tensor, pictures: torch.Tensor, labels: torch.Tensor | None = None):
        embeds = self.decoder.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == IMAGE).unsqueeze(-1), self.projector(pictures).to(embeds.dtype))
        return self.decoder(inputs_embeds=embeds, labels=labels)


@torch.no_grad()
def held_out_accuracy(model: Binder, episodes: Episodes) -> tuple[float, float]:
    """(accuracy, share naming one of the two words) of the first syllable on answerable pictures of 128 held-out
    5-picture episodes."""
    ids, _, pictures, answerable = episodes.batch(episodes.held_out, 128, 5)
    predicted = model(ids, pictures).logits.argmax(-1)
    hits = named = total = 0
    for row, turns in enumerate(answerable):
        for position, target, options in turns:
            guess = int(predicted[row, position])
            hits, named, total = hits + (guess == target), named + (guess in options), total + 1
    return hits / total, named / total


def main() -> None:
    args = arguments()
    torch.manual_seed(args.seed)
    episodes = Episodes(args)
    model = Binder(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50))
    print(f"{args.layout} layout{' with the words offered' if args.offer else ''}, {args.decoder} decoder: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids, labels, pictures, _ = episodes.batch(episodes.training, args.batch_size, args.turns)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(ids, pictures, labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0:
            accuracy, named = held_out_accuracy(model, episodes)
            print(f"step {step:6d}  loss {loss.item():.3f}  held-out accuracy {accuracy:.3f}  names a word {named:.3f}"
                  f"  {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()

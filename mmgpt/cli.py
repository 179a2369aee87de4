"""`mmgpt` command line: data, train, eval, chat, demo."""

from __future__ import annotations

import argparse
import json
import sys


def _data_shapes(args: argparse.Namespace) -> int:
    from mmgpt.data.shapes import write_shapes

    train_path, eval_path = write_shapes(args.out, seed=args.seed, train=args.train, eval=args.eval)
    print(f"wrote {train_path} ({args.train} records) and {eval_path} ({args.eval} records)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from mmgpt.config import load_config
    from mmgpt.train import train

    overrides = [pair for group in args.set for pair in group]
    result = train(load_config(args.config, overrides))
    return 0 if result.final_dir is not None else 130


def _eval(args: argparse.Namespace) -> int:
    from mmgpt.evaluate import evaluate
    from mmgpt.inference import MMGPT

    model = MMGPT.from_pretrained(args.checkpoint, device=args.device)
    print(json.dumps(evaluate(model, args.data, batch_size=args.batch_size, out=args.out)))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from mmgpt.inference import MMGPT

    model = MMGPT.from_pretrained(args.checkpoint, device=args.device)
    content = [{"type": "image", "image": image} for image in args.image] + [{"type": "text", "text": args.question}]
    for piece in model.chat([{"role": "user", "content": content}], max_new_tokens=args.max_new_tokens, stream=True):
        print(piece, end="", flush=True)
    print()
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="mmgpt", description="A small, hackable vision-language GPT.")
    commands = root.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="write a synthetic data set").add_subparsers(dest="kind", required=True)
    shapes = data.add_parser("shapes", help="coloured shapes: captions, VQA chats, interleaved documents")
    shapes.add_argument("--out", required=True, help="folder for train.jsonl, eval.jsonl and images/")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--train", type=int, default=8000, help="training records")
    shapes.add_argument("--eval", type=int, default=500, help="held-out VQA chats")
    shapes.set_defaults(run=_data_shapes)

    train = commands.add_parser("train", help="train (resumes from the newest checkpoint of the run)")
    train.add_argument("config", help="YAML config, e.g. configs/tiny-shapes.yaml")
    train.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                       help="override config values, e.g. --set train.lr=1e-3 train.max_steps=100")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="accuracy on held-out chats, with a blind (blank image) baseline")
    evaluate.add_argument("checkpoint", help="a saved model folder, e.g. runs/tiny-shapes/final")
    evaluate.add_argument("--data", required=True, help="JSONL of chats ending with the reference answer")
    evaluate.add_argument("--out", help="write per-sample predictions (JSONL) here")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--device", default=None)
    evaluate.set_defaults(run=_eval)

    chat = commands.add_parser("chat", help="ask one question about one or more images")
    chat.add_argument("checkpoint")
    chat.add_argument("question")
    chat.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--device", default=None)
    chat.set_defaults(run=_chat)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from mmgpt.config import ConfigError
    from mmgpt.data.records import RecordError
    from mmgpt.images import ImageError

    try:
        return args.run(args)
    except (ConfigError, RecordError, ImageError, FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"mmgpt {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmgpt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

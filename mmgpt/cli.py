"""`mmgpt` command line: data, train, estimate, eval, chat, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from mmgpt.data.clutter import STYLES
from mmgpt.data.episodes import WORD_FORMS
from mmgpt.data.tool_chats import CHATS as TOOL_CHATS


def _data_shapes(args: argparse.Namespace) -> int:
    from mmgpt.data.shapes import write_shapes

    paths = write_shapes(args.out, seed=args.seed, train=args.train, eval=args.eval, episodes=args.episodes,
                         eval_episodes=args.eval_episodes, ways=args.ways, per_way=args.per_way,
                         episode_words=args.episode_words, copy_drills=args.copy_drills,
                         episode_ways=args.episode_ways, system_rules=args.system_rules, rules_eval=args.rules_eval,
                         rules_prompts=args.rules_prompts, tools=args.tools, tool=args.tool)
    for path in paths:
        print(f"wrote {path} ({sum(1 for _ in path.open())} records)")
    return 0


def _data_clutter(args: argparse.Namespace) -> int:
    from mmgpt.data.clutter import write_clutter

    for path in write_clutter(args.out, style=args.style, seed=args.seed, train=args.train, eval=args.eval):
        print(f"wrote {path} ({sum(1 for _ in path.open())} records)")
    return 0


def _data_pairs(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from mmgpt.data.eval_records import read_eval_items
    from mmgpt.data.pairs import write_pairs
    from mmgpt.dpo import sample_pairs
    from mmgpt.inference import MMGPT

    if not 0 <= args.eval_share < 1:
        raise ValueError(f"--eval-share must be in [0, 1), got {args.eval_share}")
    model = MMGPT.from_pretrained(args.checkpoint, device=args.device)
    items = read_eval_items(args.prompts)
    held_out = int(len(items) * args.eval_share)
    split = {args.out: items[held_out:]}
    if held_out:
        split[args.out.with_name(f"{args.out.stem}-eval{args.out.suffix}")] = items[:held_out]
    with tqdm(total=len(items), desc="sampling replies", unit="prompt") as progress:
        for out, part in split.items():
            records, clean = sample_pairs(model, part, args.samples, args.temperature, args.batch_size,
                                          args.max_new_tokens, progress)
            write_pairs(records, out)
            progress.write(f"wrote {out} ({len(records)} pairs from {len(part) - clean} of {len(part)} prompts; "
                           f"{clean} answered well in all {args.samples} samples and gave none)")
    return 0


def _data_convert(args: argparse.Namespace) -> int:
    from mmgpt.data.formats import read_samples, write_jsonl

    samples, skipped = read_samples(args.input, args.format, args.image_folder, args.skip_bad_records)
    out = write_jsonl(samples, Path(args.out))
    print(f"wrote {out} ({len(samples)} records" + (f"; skipped {len(skipped)}: first {skipped[0]}" if skipped else "") + ")")
    return 0


def _data_shard(args: argparse.Namespace) -> int:
    from mmgpt.data.formats import iter_samples, sample_record
    from mmgpt.data.shards import write_shards

    skipped: list[str] = []
    samples = iter_samples(args.input, args.format, args.image_folder, args.skip_bad_records, skipped)
    index = write_shards(samples, Path(args.out), args.shard_size, sample_record)
    print(f"wrote {len(index['shards'])} shard(s) of up to {args.shard_size} samples, {index['samples']} in all, to "
          f"{args.out}" + (f"; skipped {len(skipped)} bad record(s), first: {skipped[0]}" if skipped else ""))
    return 0


def _train(args: argparse.Namespace) -> int:
    from mmgpt.config import load_config
    from mmgpt.train import train

    overrides = [pair for group in args.set for pair in group]
    result = train(load_config(args.config, overrides))
    return 0 if result.final_dir is not None else 130


def _estimate(args: argparse.Namespace) -> int:
    from mmgpt.config import load_config
    from mmgpt.estimate import estimate, format_estimate

    config = load_config(args.config, [pair for group in args.set for pair in group])
    data = args.data if args.data is not None else (config.data.train if Path(config.data.train).is_file() else "")
    figures = estimate(config, args.gpus, args.gpu, args.mfu, data)
    print(json.dumps(figures) if args.json else format_estimate(figures))
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expects a whole number of at least 1, got {text!r}")
    return value


def _whole_numbers(option: str, example: str, text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{option} takes whole numbers separated by commas, e.g. {example}; got {text!r}")


def _shot_counts(text: str) -> list[int]:
    counts = _whole_numbers("--shots", "0,1,2,4", text)
    if any(count < 0 for count in counts) or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"--shots takes distinct numbers >= 0; got {text!r}")
    return counts


def _way_counts(text: str) -> tuple[int, ...]:
    return tuple(_whole_numbers("--episode-ways", "2,3,4", text))


def _eval(args: argparse.Namespace) -> int:
    import contextlib

    from mmgpt.evaluate import evaluate
    from mmgpt.inference import MMGPT
    from mmgpt.plot import plot_few_shot

    model = MMGPT.from_pretrained(args.checkpoint, device=args.device)
    with open(args.out, "w") if args.out else contextlib.nullcontext() as out:
        results = [evaluate(model, data, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, out=out,
                            shots=shots, support=args.support, seed=args.seed, tools=args.tools,
                            max_tool_calls=args.max_tool_calls)
                   for data in args.data for shots in args.shots]
    if len(results) == 1:
        print(json.dumps(results[0]))
        return 0
    width = max(len(kind) for result in results for kind in result["by_kind"])
    print(f"{'kind':<{width}}  {'shots':>5}  {'accuracy':>8}  {'blind':>6}  {'n':>5}")
    for result in results:
        for kind, scores in result["by_kind"].items():
            print(f"{kind:<{width}}  {result['shots']:>5}  {scores['accuracy']:>8.3f}  {scores['blind_accuracy']:>6.3f}"
                  f"  {scores['n']:>5}")
    run = Path(args.checkpoint).resolve().parent
    name = Path(args.data[0]).stem if len(args.data) == 1 else "several"
    plot_path = Path(args.plot) if args.plot else run / f"few-shot-{name}.png"
    folder = Path(args.data[0]).parent
    sources = Path(args.data[0]).name if len(args.data) == 1 else f"{len(args.data)} files in {folder}"
    plot_few_shot(results, plot_path, title=f"{run.name} on {sources}")
    print(f"plot: {plot_path}")
    print(json.dumps(results))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from mmgpt.inference import MMGPT

    model = MMGPT.from_pretrained(args.checkpoint, device=args.device)
    content = [{"type": "image", "image": image} for image in args.image] + [{"type": "text", "text": args.question}]
    system = model.processor.system_prompt if args.system is None else args.system
    messages = ([{"role": "system", "content": system}] if system.strip() else []) + [{"role": "user", "content": content}]
    if not args.tools:
        for piece in model.chat(messages, max_new_tokens=args.max_new_tokens, stream=True):
            print(piece, end="", flush=True)
        print()
        return 0
    for event in model.chat(messages, max_new_tokens=args.max_new_tokens, stream=True, tools=args.tools,
                            max_tool_calls=args.max_tool_calls):
        if isinstance(event, str):
            print(event, end="", flush=True)
        elif event["role"] == "assistant":
            print("".join(f"\n[call] {call['function']['name']} {json.dumps(call['function']['arguments'])}"
                          for call in event["tool_calls"]), flush=True)
        else:
            shown = [part["text"] if part["type"] == "text" else f"<picture {part['image'].size[0]}x{part['image'].size[1]}>"
                     for part in event["content"]]
            print(f"[result] {' '.join(shown)}", flush=True)
    print()
    return 0


BUILTIN_TOOLS = {"zoom": "mmgpt.data.tool_chats:zoom", "find_regions": "mmgpt.data.tool_chats:find_regions"}


def _tool(text: str):
    """A tool by name (`BUILTIN_TOOLS`) or import path (package.module:function)."""
    import importlib

    path = BUILTIN_TOOLS.get(text, text)
    module_name, _, name = path.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"unknown tool {text!r}: use one of {', '.join(BUILTIN_TOOLS)} or "
                                         "package.module:function")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise argparse.ArgumentTypeError(f"tool {text!r} cannot be imported: {error}") from None
    if not callable(function):
        raise argparse.ArgumentTypeError(f"tool {text!r} is not a function")
    return function


def _add_tool_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--tools", type=_tool, nargs="+", default=None, metavar="TOOL",
                         help=f"offer these tools: {', '.join(BUILTIN_TOOLS)} (the shapes world's quadrant zoom and "
                              "region finder) or "
                              "package.module:function (a function with type hints and a docstring)")
    command.add_argument("--max-tool-calls", type=int, default=4, help="calls allowed before the model must answer")


ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny-shapes.yaml"


def ensure_tiny_model() -> Path:
    """The bundled tiny model's folder; on first use, make its data and train it (with a progress bar)."""
    from mmgpt.config import load_config
    from mmgpt.data.shapes import write_shapes
    from mmgpt.train import train

    config = load_config(TINY_CONFIG)
    output_dir = ROOT / config.output_dir
    final = output_dir / "final"
    if (final / "model.safetensors").is_file():
        return final
    data_dir = ROOT / Path(config.data.train).parent
    if not (data_dir / "train.jsonl").is_file() or not (data_dir / "eval.jsonl").is_file():
        print(f"writing the shapes data set to {data_dir} ...")
        write_shapes(data_dir)
    print(f"training the tiny model (about 15 minutes on 2 CPU cores) into {output_dir} ...")
    config.output_dir = str(output_dir)
    config.data.train = str(ROOT / config.data.train)
    config.data.eval = str(ROOT / config.data.eval)
    return train(config).final_dir


def _demo(args: argparse.Namespace) -> int:
    import importlib.util

    app_path = ROOT / "demo" / "app.py"
    if not app_path.is_file():
        raise FileNotFoundError(f"{app_path} not found: run the demo from a checkout of the repository")
    spec = importlib.util.spec_from_file_location("mmgpt_demo_app", app_path)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_tiny_model()
    if checkpoint is None:
        return 130
    from mmgpt.inference import MMGPT

    app.launch(MMGPT.from_pretrained(checkpoint, device=args.device), str(checkpoint), args.host, args.port,
               open_browser=args.open_browser, tools=args.tools)
    return 0


def _data_input(command: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of a command that reads a data set in any known format."""
    command.add_argument("input", help="data file or folder")
    command.add_argument("--format", default="", help="jsonl, llava, hf, webdataset or shards (default: detected)")
    command.add_argument("--image-folder", default="", help="folder the input's image paths are relative to")
    command.add_argument("--skip-bad-records", action="store_true", help="skip (and count) bad records")
    return command


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="mmgpt", description="A small, hackable vision-language GPT.")
    root.add_argument("--debug", action="store_true", help="show the full traceback of an error (or MMGPT_DEBUG=1)")
    commands = root.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="write a synthetic data set, or convert one").add_subparsers(dest="kind", required=True)
    shapes = data.add_parser("shapes", help="coloured shapes: captions, VQA chats, interleaved documents")
    shapes.add_argument("--out", required=True, help="folder for train.jsonl, eval.jsonl and images/")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--train", type=int, default=8000, help="training records")
    shapes.add_argument("--eval", type=int, default=500, help="held-out VQA chats")
    shapes.add_argument("--episodes", type=int, default=0,
                        help="fast-binding episodes (made-up words bound in context) added to train.jsonl")
    shapes.add_argument("--eval-episodes", type=int, default=0,
                        help="episodes of each held-out set (episodes-eval*.jsonl: new pairings, unseen letters, other "
                             "lengths, 3- to 5-way), for `mmgpt eval --shots`")
    shapes.add_argument("--ways", type=int, default=2,
                        help="categories per episode: held-out new pairings, and training unless --episode-ways")
    shapes.add_argument("--episode-ways", type=_way_counts, default=(),
                        help="training episodes only: draw each one's categories from these counts, e.g. 2,3,4")
    shapes.add_argument("--episode-words", choices=WORD_FORMS, default="syllables",
                        help="training episodes' words: two known syllables, or random strings of 1-8 letters "
                             "that only copying can name, of every letter but chjqwy (strings) or of all (alphabet)")
    shapes.add_argument("--copy-drills", type=int, default=0,
                        help="plain-text drills (a list of random words, then the same list again) added to "
                             "train.jsonl: copying practice over every letter, none bound to a picture")
    shapes.add_argument("--system-rules", type=int, default=0,
                        help="chats under a system rule (capitals, one topic, a secret code word), some of whose user "
                             "turns try to break it, added to train.jsonl; also writes rules-eval.jsonl (held-out "
                             "attacks and code words) and rules-prompts.jsonl (for `mmgpt data pairs`)")
    shapes.add_argument("--rules-eval", type=_positive, default=650,
                        help="held-out rule questions in rules-eval.jsonl, spread over every rule and turn kind")
    shapes.add_argument("--rules-prompts", type=_positive, default=1300,
                        help="rule questions in training phrasings in rules-prompts.jsonl")
    shapes.add_argument("--tools", type=int, default=0,
                        help="chats offering --tool, added to train.jsonl (`mmgpt.data.tool_chats`); eval.jsonl "
                             "stays the same")
    shapes.add_argument("--tool", choices=tuple(TOOL_CHATS), default="zoom",
                        help="zoom: one quadrant enlarged, the assistant looking closer before colour, presence, "
                             "position and count questions; find_regions: the regions of one colour measured (colour, "
                             "form, place, size), one call asking for the question's colour and shape before every "
                             "one-picture question")
    shapes.add_argument("--per-way", type=int, default=5,
                        help="records per category and held-out episode (allows up to per-way - 1 shots)")
    shapes.set_defaults(run=_data_shapes)

    clutter = data.add_parser("clutter", help="another world: QA chats only, objects anywhere, skewed answers")
    clutter.add_argument("--out", required=True, help="folder for train.jsonl, eval.jsonl and images/")
    clutter.add_argument("--style", choices=tuple(STYLES), default="clutter",
                         help="clutter: filled shapes on pale or textured grounds; sketch: outlines, another palette, "
                              "dark or noisy grounds; tiles: filled shapes with a dark edge, a third palette, shaded "
                              "or checked grounds (kept for checking recipes on a world they were not tuned on)")
    clutter.add_argument("--seed", type=int, default=0)
    clutter.add_argument("--train", type=int, default=6000, help="training pictures, a chat of up to 5 questions each")
    clutter.add_argument("--eval", type=int, default=600, help="held-out questions, balanced by answer in each kind")
    clutter.set_defaults(run=_data_clutter)

    pairs = data.add_parser("pairs", help="preference pairs for train.objective=dpo from a model's own sampled replies")
    pairs.add_argument("checkpoint", help="the model whose replies are sampled (the DPO stage's model.init_from)")
    pairs.add_argument("--prompts", required=True,
                       help="chats ending with the reference reply (eval form), e.g. rules-prompts.jsonl: the chosen "
                            "reply; each distinct mistaken or rule-breaking sample is a rejected one")
    pairs.add_argument("--out", type=Path, required=True, help="pairs JSONL, in the folder of the prompts' images")
    pairs.add_argument("--samples", type=_positive, default=4, help="replies sampled per prompt")
    pairs.add_argument("--temperature", type=float, default=1.0)
    pairs.add_argument("--eval-share", type=float, default=0.1,
                       help="share of the prompts whose pairs go to OUT-eval.jsonl (data.eval) instead")
    pairs.add_argument("--batch-size", type=_positive, default=64, help="prompts sampled at once")
    pairs.add_argument("--max-new-tokens", type=_positive, default=32)
    pairs.add_argument("--device", default=None)
    pairs.set_defaults(run=_data_pairs)

    convert = _data_input(data.add_parser(
        "convert", help="any known format (LLaVA, ShareGPT, HF datasets, webdataset) -> our JSONL"))
    convert.add_argument("--to", choices=["jsonl"], default="jsonl")
    convert.add_argument("--out", required=True, help="JSONL to write; images outside its folder go to images/ beside it")
    convert.set_defaults(run=_data_convert)

    shard = _data_input(data.add_parser(
        "shard", help="any known format -> tar shards with images inside, for streaming training"))
    shard.add_argument("--out", required=True, help="folder for shard-NNNNNN.tar and mmgpt-shards.json")
    shard.add_argument("--shard-size", type=_positive, default=10_000, help="samples a shard (at least one shard per "
                                                                      "process x worker that will read them)")
    shard.set_defaults(run=_data_shard)

    train = commands.add_parser("train", help="train (resumes from the newest checkpoint of the run)")
    train.add_argument("config", help="YAML config, e.g. configs/tiny-shapes.yaml")
    train.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                       help="override config values, e.g. --set train.lr=1e-3 train.max_steps=100")
    train.set_defaults(run=_train)

    estimate = commands.add_parser("estimate", help="parameters, FLOPs, memory per GPU and time of a training config")
    estimate.add_argument("config", help="YAML config, e.g. configs/siglip-gpt2-stage2.yaml")
    estimate.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE")
    estimate.add_argument("--gpus", type=_positive, default=1, help="GPUs (processes) the global batch is split over")
    estimate.add_argument("--gpu", default="h100", help="h200, h100, a100, a100-40gb, l40s, l4, a10, v100")
    estimate.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilisation assumed for the time")
    estimate.add_argument("--data", help="JSONL whose first 1,000 records give tokens and images per sample "
                                         "(default: data.train when it exists, else 64 text tokens and 1 image)")
    estimate.add_argument("--json", action="store_true", help="print the figures as JSON")
    estimate.set_defaults(run=_estimate)

    evaluate = commands.add_parser("eval", help="accuracy on held-out chats, zero- or few-shot, with a blind (blank "
                                               "image) baseline")
    evaluate.add_argument("checkpoint", help="a saved model folder, e.g. runs/tiny-shapes/final")
    evaluate.add_argument("--data", required=True, nargs="+",
                          help="JSONL of chats ending with the reference answer, or of document records with an "
                               "answer; several files: one table and one plot")
    evaluate.add_argument("--out", help="write per-sample predictions (JSONL) here")
    evaluate.add_argument("--shots", type=_shot_counts, default=[0], metavar="K[,K...]",
                          help="solved examples before each query, e.g. 0,1,2,4 (several: a table and a plot); with "
                               "fast-binding episodes K counts examples per category")
    evaluate.add_argument("--support", help="draw the solved examples from this JSONL instead of --data")
    evaluate.add_argument("--seed", type=int, default=0, help="seed for drawing the solved examples")
    evaluate.add_argument("--plot", help="accuracy-against-shots plot (default: beside the checkpoint)")
    evaluate.add_argument("--batch-size", type=_positive, default=64)
    evaluate.add_argument("--max-new-tokens", type=_positive, default=16,
                          help="longest answer in tokens (greedy decoding stops at the end of the turn before it); "
                               "32 for rules-eval.jsonl, whose capital letters take a token each")
    evaluate.add_argument("--device", default=None)
    _add_tool_options(evaluate)
    evaluate.set_defaults(run=_eval)

    chat = commands.add_parser("chat", help="ask one question about one or more images")
    chat.add_argument("checkpoint")
    chat.add_argument("question")
    chat.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    chat.add_argument("--max-new-tokens", type=_positive, default=64)
    chat.add_argument("--system", help="system prompt (default: the one the model was trained under, if any; "
                                       "'' for none)")
    chat.add_argument("--device", default=None)
    _add_tool_options(chat)
    chat.set_defaults(run=_chat)

    demo = commands.add_parser("demo", help="web chat demo (trains the bundled tiny model first if needed)")
    demo.add_argument("checkpoint", nargs="?", help="a saved model folder; default: the bundled tiny model")
    demo.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--open-browser", action="store_true", help="open the page in the default browser")
    demo.add_argument("--tools", action="store_true", help="start with the tools switch (zoom) on")
    demo.add_argument("--device", default=None)
    demo.set_defaults(run=_demo)
    return root


def _one_line(error: BaseException) -> str:
    """The first line of an error's message, with the error's kind when the message alone does not say it."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    kind = type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in message:
        message = f"{message}: {error.filename}"
    return message if kind in OWN_ERRORS else f"{kind}: {message}"


OWN_ERRORS = ("ConfigError", "RecordError", "ImageError", "TrainingError", "ContextTooLongError")


def main(argv: list[str] | None = None) -> int:
    """An error ends in one line naming what was wrong (a bad file, value or argument is the usual cause);
    `--debug` (or MMGPT_DEBUG=1) adds the traceback."""
    args = parser().parse_args(argv)
    debug = args.debug or os.environ.get("MMGPT_DEBUG", "") not in ("", "0")
    from safetensors import SafetensorError

    try:
        return args.run(args)
    except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as error:
        if debug:
            traceback.print_exc()
        hint = "" if debug or type(error).__name__ in OWN_ERRORS else " (--debug shows the traceback)"
        print(f"mmgpt {args.command}: error: {_one_line(error)}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmgpt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

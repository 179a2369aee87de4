"""The data formats people bring -> our records -> `Sample`s, through the same checks as our own JSONL.

Each reader turns one foreign record into our record shape (`{"messages": ...}` or `{"content": ...}`) and hands it
to `parse_record` with a `where` that names the file and line (or shard and key), so every format gets the same
checks, errors and image rules (paths may not leave the image folder; decompression bombs refused).

  jsonl        ours: {"messages": [...]} chats and {"content": [...]} documents, images relative to the file
  llava        LLaVA / ShareGPT / OpenAI-style JSON or JSONL: "conversations" [{from, value}] or "messages"
               [{role, content}] with one "<image>" per image of "image" (a path or a list) or "images"
  hf           a Hugging Face dataset saved locally (`save_to_disk` folder, or parquet): "images" with "texts"
               [{user, assistant}] (the_cauldron) or "messages" with {"type": "image"} items (TRL)
  webdataset   caption shards: a .tar (or a folder of them) of KEY.jpg|png|webp + KEY.txt or KEY.json
  shards       ours, from `mmgpt data shard`: tar shards of KEY.json records with their images inside, for streaming
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator

from mmgpt.data.records import RecordError, Sample, iter_lines, parse_record
from mmgpt.data.shards import SHARD_INDEX, read_shard, shard_paths
from mmgpt.images import ImageBytes

PLACEHOLDER = "<image>"
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

# (a call that gives the record in our shape or raises RecordError, folder its image paths are relative to, where it
# came from): the call is made where a bad record can be skipped, so one bad line never ends the file
Located = tuple[Callable[[], Any], "Path | None", str]


def read_jsonl(path: str | Path, skip_bad: bool = False) -> tuple[list[Sample], list[str]]:
    """Our own JSONL (chats and documents, images relative to the file)."""
    return read_samples(path, "jsonl", skip_bad=skip_bad)


def read_samples(path: str | Path, format: str = "", image_folder: str = "", skip_bad: bool = False
                 ) -> tuple[list[Sample], list[str]]:
    """All samples of a data file or folder in any known format, plus the errors of skipped records (only when
    `skip_bad`, never silently)."""
    skipped: list[str] = []
    return list(iter_samples(path, format, image_folder, skip_bad, skipped)), skipped


def iter_samples(path: str | Path, format: str = "", image_folder: str = "", skip_bad: bool = False,
                 skipped: list[str] | None = None) -> Iterator[Sample]:
    """The samples one by one, for sets too large to hold (`mmgpt data shard`); skipped records' errors are
    appended to `skipped`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data not found: {path}")
    format = format or detect_format(path)
    if format not in READERS:
        raise RecordError(f"{path}: unknown data format {format!r}; known: {', '.join(READERS)}")
    for make_record, base_dir, where in READERS[format](path, Path(image_folder) if image_folder else None):
        try:
            yield parse_record(make_record(), base_dir, where)
        except RecordError as error:
            if not skip_bad:
                raise
            if skipped is not None:
                skipped.append(str(error))


def detect_format(path: Path) -> str:
    """The format from the file or folder itself; a clear error naming the known ones when nothing fits."""
    if path.is_dir():
        if (path / SHARD_INDEX).is_file():
            return "shards"
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file() or any(path.glob("*.parquet")):
            return "hf"
        if any(path.glob("*.tar")):
            return "webdataset"
    elif path.suffix == ".tar":
        return "webdataset"
    elif path.suffix == ".parquet":
        return "hf"
    elif path.suffix in (".json", ".jsonl"):
        first = _first_record(path)
        if isinstance(first, dict) and ("conversations" in first or "image" in first or "images" in first
                                        or any(isinstance(m, dict) and isinstance(m.get("content"), str)
                                               and PLACEHOLDER in m["content"] for m in first.get("messages", []))):
            return "llava"
        if path.suffix == ".jsonl":
            return "jsonl"
    raise RecordError(f"{path}: cannot tell its data format; name it with data.format ({', '.join(READERS)})")


def _first_record(path: Path) -> Any:
    if path.suffix == ".jsonl":
        line = next((line for line in iter_lines(path) if line.strip()), "{}")
        return json.loads(line)
    with open(path, encoding="utf-8") as handle:
        head = handle.read(1)
    if head.strip() != "[":
        return None
    records = json.loads(path.read_text(encoding="utf-8"))
    return records[0] if records else None


def _json_records(path: Path) -> Iterator[tuple[Callable[[], Any], str]]:
    """(record decoder, where) of a JSONL file (one per line) or a JSON file holding a list of records."""
    if path.suffix == ".jsonl":
        for line_number, line in enumerate(iter_lines(path), start=1):
            if line.strip():
                where = f"{path.name} line {line_number}"
                yield (lambda line=line, where=where: _decode(line, where)), where
        return
    records = _decode(path.read_text(encoding="utf-8"), path.name)
    if not isinstance(records, list):
        raise RecordError(f"{path.name}: expected a JSON list of records")
    for index, record in enumerate(records):
        yield (lambda record=record: record), f"{path.name} record {index}"


def _decode(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise RecordError(f"{where}: malformed JSON ({error.msg} at column {error.colno})") from None


def _ours(path: Path, image_folder: Path | None) -> Iterator[Located]:
    for decode, where in _json_records(path):
        yield decode, image_folder or path.parent, where


def _with_placeholders(text: str, images: list, where: str) -> list[dict]:
    """Text with "<image>" placeholders -> content items, taking the next image for each placeholder."""
    items: list[dict] = []
    for position, piece in enumerate(text.split(PLACEHOLDER)):
        if position:
            if not images:
                raise RecordError(f"{where}: more {PLACEHOLDER} placeholders than images")
            items.append({"type": "image", "image": images.pop(0)})
        if piece.strip():
            items.append({"type": "text", "text": piece.strip("\n")})
    return items


def conversation_record(turns: list[dict], images: list, where: str) -> dict:
    """LLaVA / ShareGPT / OpenAI-style turns ({from, value} or {role, content}) and their images -> our chat."""
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"{where}: 'conversations' or 'messages' must be a non-empty list")
    remaining = list(images)
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"{where}: turn {index} must be an object")
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if speaker not in ROLE_NAMES:
            raise RecordError(f"{where}: turn {index} has unknown speaker {speaker!r} (expected one of {list(ROLE_NAMES)})")
        if not isinstance(text, str):
            raise RecordError(f"{where}: turn {index} needs its text as a string")
        messages.append({"role": ROLE_NAMES[speaker], "content": _with_placeholders(text, remaining, where)})
    if remaining:
        raise RecordError(f"{where}: {len(images)} image(s) but {len(images) - len(remaining)} {PLACEHOLDER} placeholder(s)")
    return {"messages": messages}


def _llava(path: Path, image_folder: Path | None) -> Iterator[Located]:
    for decode, where in _json_records(path):
        yield (lambda decode=decode, where=where: _llava_record(decode(), where)), image_folder or path.parent, where


def _llava_record(record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise RecordError(f"{where}: a record must be a JSON object")
    images = record.get("images", record.get("image", []))
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list):
        raise RecordError(f"{where}: 'image'/'images' must be a path or a list of paths")
    return conversation_record(record.get("conversations", record.get("messages")), images, where)


def _webdataset(path: Path, image_folder: Path | None) -> Iterator[Located]:
    """Caption shards: each KEY's image and its caption (KEY.txt, or "caption"/"text" in KEY.json) as a document."""
    shards = sorted(path.glob("*.tar")) if path.is_dir() else [path]
    for shard in shards:
        with tarfile.open(shard) as archive:
            groups: dict[str, dict[str, bytes]] = {}
            for member in archive:
                if member.isfile():
                    key, _, extension = member.name.partition(".")
                    groups.setdefault(key, {})[extension.lower()] = archive.extractfile(member).read()
        for key, parts in groups.items():
            where = f"{shard.name} key {key}"
            yield (lambda parts=parts, where=where, name=f"{shard.name}:{key}": _caption_record(parts, name, where)), None, where


def _caption_record(parts: dict[str, bytes], name: str, where: str) -> dict:
    image = next((ImageBytes(parts[ext], f"{name}.{ext}") for ext in ("jpg", "jpeg", "png", "webp") if ext in parts), None)
    if image is None:
        raise RecordError(f"{where}: no image (jpg, jpeg, png or webp)")
    if "txt" in parts:
        caption = parts["txt"].decode("utf-8")
    elif "json" in parts:
        meta = _decode(parts["json"].decode("utf-8"), where)
        caption = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
    else:
        caption = None
    if not isinstance(caption, str):
        raise RecordError(f"{where}: no caption (KEY.txt, or 'caption' in KEY.json)")
    return {"content": [{"type": "image", "image": image}, {"type": "text", "text": caption}]}


def _hf(path: Path, image_folder: Path | None) -> Iterator[Located]:
    """A saved Hugging Face dataset; images stay encoded (the Image feature read without decoding) until a batch
    needs them."""
    try:
        import datasets
    except ImportError:
        raise RecordError(f"{path}: reading a Hugging Face dataset needs the datasets package: pip install datasets") from None
    if path.is_dir() and not any(path.glob("*.parquet")):
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    else:
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        dataset = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    if "images" in dataset.features:
        dataset = dataset.cast_column("images", datasets.List(datasets.Image(decode=False)))
    for index, row in enumerate(dataset):
        yield (lambda row=row, index=index: _hf_record(row, f"{path.name} row {index}", f"{path.name}:row{index}")), \
            image_folder, f"{path.name} row {index}"


def _hf_record(row: dict, where: str, name: str) -> dict:
    images = [_embedded(image, f"{name}.{position}") for position, image in enumerate(row.get("images") or [])]
    if "texts" in row:
        return _cauldron_record(row["texts"], images, where)
    if "messages" in row:
        return _trl_record(row["messages"], images, where)
    raise RecordError(f"{where}: expected 'texts' (the_cauldron) or 'messages' (TRL) beside 'images'")


def _embedded(image: Any, name: str) -> Any:
    """An HF Image value ({"bytes", "path"}) -> its bytes, or its path when the bytes are not stored."""
    if isinstance(image, dict) and image.get("bytes"):
        return ImageBytes(image["bytes"], name)
    if isinstance(image, dict) and image.get("path"):
        return image["path"]
    raise RecordError(f"{name}: an image with neither bytes nor a path")


def _cauldron_record(texts: Any, images: list, where: str) -> dict:
    """the_cauldron: every image before the first question, then the user/assistant pairs."""
    if not isinstance(texts, list) or not texts:
        raise RecordError(f"{where}: 'texts' must be a non-empty list of {{user, assistant}}")
    messages = []
    for index, pair in enumerate(texts):
        if not isinstance(pair, dict) or not isinstance(pair.get("user"), str) or not isinstance(pair.get("assistant"), str):
            raise RecordError(f"{where}: texts[{index}] needs 'user' and 'assistant' strings")
        leading = [{"type": "image", "image": image} for image in images] if index == 0 else []
        messages.append({"role": "user", "content": [*leading, {"type": "text", "text": pair["user"]}]})
        messages.append({"role": "assistant", "content": pair["assistant"]})
    return {"messages": messages}


def _trl_record(messages: Any, images: list, where: str) -> dict:
    """TRL's conversational layout: {"type": "image"} items take the row's images in order."""
    if not isinstance(messages, list):
        raise RecordError(f"{where}: 'messages' must be a list")
    remaining = list(images)
    converted = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            items = []
            for item in content:
                if isinstance(item, dict) and item.get("type") == "image":
                    if not remaining:
                        raise RecordError(f"{where}: more image items than images")
                    items.append({"type": "image", "image": remaining.pop(0)})
                elif isinstance(item, dict) and item.get("type") == "text":
                    items.append({"type": "text", "text": item.get("text")})
            content = items
        converted.append({**message, "content": content} if isinstance(message, dict) else message)
    if remaining:
        raise RecordError(f"{where}: {len(images)} image(s) but {len(images) - len(remaining)} image item(s)")
    return {"messages": converted}


def _shards(path: Path, image_folder: Path | None) -> Iterator[Located]:
    for shard in shard_paths(path):
        for make_record, where in read_shard(shard):
            yield make_record, None, where


READERS: dict[str, Callable[[Path, Path | None], Iterator[Located]]] = {
    "jsonl": _ours, "llava": _llava, "hf": _hf, "webdataset": _webdataset, "shards": _shards,
}


def write_jsonl(samples: list[Sample], out: Path) -> Path:
    """Our JSONL of `samples`, for `mmgpt data convert`: image paths inside the output's folder are kept relative,
    other files are copied and embedded images written into `images/` beside it."""
    out = Path(out)
    folder = out.parent.resolve()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    written = 0

    def place(image: Any) -> str:
        nonlocal written
        if isinstance(image, Path) and image.resolve().is_relative_to(folder):
            return str(image.resolve().relative_to(folder))
        written += 1
        if isinstance(image, ImageBytes):
            target = folder / "images" / f"{written:08d}{suffix_of(image.data)}"
            target.write_bytes(image.data)
        else:
            target = folder / "images" / f"{written:08d}{Path(image).suffix}"
            shutil.copyfile(image, target)
        return str(target.relative_to(folder))

    with open(out, "w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps(sample_record(sample, place), ensure_ascii=False) + "\n")
    return out


def sample_record(sample: Sample, place: Callable[[Any], str]) -> dict:
    """A sample back in our record shape, each image replaced by what `place` makes of it (a path, a member name)."""
    turns = [{"role": turn.role, "content": [
        {"type": "image", "image": place(segment.image)} if segment.is_image else {"type": "text", "text": segment.text}
        for segment in turn.segments]} for turn in sample.turns]
    return {"messages": turns} if sample.is_chat else {"content": turns[0]["content"]}


def suffix_of(data: bytes) -> str:
    for signature, suffix in ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"RIFF", ".webp"), (b"GIF8", ".gif")):
        if data.startswith(signature):
            return suffix
    return ".img"

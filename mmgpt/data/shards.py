"""Streaming shards: sets larger than memory (or than one machine's disk), read as a stream that is split over
processes and decoding workers, shuffled in a buffer, and resumable at an exact position.

Layout (webdataset-style tar, readable by webdataset too): DIR/shard-000000.tar, ... hold KEY.json (one of our
records, its image items naming members of the same tar) and KEY.N.png|jpg (the images' bytes);
DIR/mmgpt-shards.json lists the shards and their sample counts. Nothing is read before training starts but that
index: start-up and memory do not grow with the set.

The stream: every epoch the shards are shuffled (seed, epoch) and dealt to the processes x workers streams (shard
i of the shuffled order to stream i mod S), so each sample comes once an epoch and no two streams read one shard;
each stream shuffles through a buffer of `data.shuffle_buffer` samples. A DataLoader takes its micro-batches from
its workers in turn, so after n micro-batches of a process, worker w has given len(range(w, n, W)) of them: a
resumed run skips exactly that many samples in each stream (reading their text, not decoding their images), hands
worker 0 the stream whose turn comes next, and goes on with the same batches.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from itertools import count
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from mmgpt.data.records import RecordError, Sample, parse_record
from mmgpt.images import ImageBytes

SHARD_INDEX = "mmgpt-shards.json"


def shard_paths(folder: Path) -> list[Path]:
    index = json.loads((Path(folder) / SHARD_INDEX).read_text())
    return [Path(folder) / shard["name"] for shard in index["shards"]]


def shard_index(folder: Path) -> dict:
    path = Path(folder) / SHARD_INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {SHARD_INDEX}: write shards with `mmgpt data shard`")
    return json.loads(path.read_text())


def write_shards(samples: Iterable[Sample], out: Path, shard_size: int,
                 sample_record: Callable[[Sample, Callable[[Any], str]], dict]) -> dict:
    """Write `samples` into tar shards of `shard_size` samples with their images inside; each shard (and the index,
    last) is written under a temporary name and renamed, so a folder never holds a half-written shard."""
    if shard_size <= 0:
        raise ValueError(f"--shard-size must be positive, got {shard_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    archive, members, written = None, 0, 0

    def close() -> None:
        nonlocal archive
        if archive is not None:
            archive.close()
            name = f"shard-{len(shards):06d}.tar"
            os.replace(out / f".tmp-{name}", out / name)
            shards.append({"name": name, "samples": members})
            archive = None

    for sample in samples:
        if archive is None:
            archive, members = tarfile.open(out / f".tmp-shard-{len(shards):06d}.tar", "w"), 0
        key = f"{written:09d}"
        images: list[tuple[str, bytes]] = []

        def place(image: Any) -> str:
            data = _image_bytes(image)
            name = f"{key}.{len(images)}{_suffix(data)}"
            images.append((name, data))
            return name

        record = json.dumps(sample_record(sample, place), ensure_ascii=False).encode()
        for name, data in [(f"{key}.json", record), *images]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        members += 1
        written += 1
        if members == shard_size:
            close()
    close()
    index = {"shards": shards, "samples": written}
    (out / f".tmp-{SHARD_INDEX}").write_text(json.dumps(index, indent=1) + "\n")
    os.replace(out / f".tmp-{SHARD_INDEX}", out / SHARD_INDEX)
    return index


def _image_bytes(image: Any) -> bytes:
    if isinstance(image, ImageBytes):
        return image.data
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return buffer.getvalue()
    return Path(image).read_bytes()


def _suffix(data: bytes) -> str:
    return ".jpg" if data.startswith(b"\xff\xd8") else ".png" if data.startswith(b"\x89PNG") else ".img"


def read_shard(shard: Path) -> Iterator[tuple[Callable[[], dict], str]]:
    """(record maker, where) of one shard, in order; images come as `ImageBytes` named shard:member."""
    with tarfile.open(shard) as archive:
        members: dict[str, bytes] = {}
        pending: list[tuple[str, bytes]] = []
        for member in archive:
            if not member.isfile():
                continue
            data = archive.extractfile(member).read()
            if member.name.endswith(".json"):
                pending.append((member.name[: -len(".json")], data))
            else:
                members[member.name] = data
            while pending and _complete(pending[0], members):
                key, record = pending.pop(0)
                yield _maker(shard, key, record, members), f"{shard.name} key {key}"
        for key, record in pending:
            yield _maker(shard, key, record, members), f"{shard.name} key {key}"


def _complete(pending: tuple[str, bytes], members: dict[str, bytes]) -> bool:
    """Whether every image a record names has been read (the writer puts them right after the record)."""
    key, record = pending
    return all(name in members for name in _image_names(json.loads(record)))


def _image_names(record: dict) -> list[str]:
    turns = record.get("messages") or [{"content": record.get("content")}]
    return [item["image"] for turn in turns if isinstance(turn.get("content"), list)
            for item in turn["content"] if isinstance(item, dict) and item.get("type") == "image"]


def _maker(shard: Path, key: str, record_bytes: bytes, members: dict[str, bytes]) -> Callable[[], dict]:
    record = json.loads(record_bytes)
    images = {name: ImageBytes(members.pop(name), f"{shard.name}:{name}") for name in _image_names(record)
              if name in members}

    def make() -> dict:
        turns = record.get("messages") or [{"content": record.get("content")}]
        for turn in turns:
            for item in turn.get("content") if isinstance(turn.get("content"), list) else []:
                if isinstance(item, dict) and item.get("type") == "image":
                    if item.get("image") not in images:
                        raise RecordError(f"{shard.name} key {key}: image {item.get('image')!r} is not in the shard")
                    item["image"] = images[item["image"]]
        return record

    return make


def batches_from_worker(consumed: int, worker: int, workers: int) -> int:
    """Micro-batches worker `worker` has given after `consumed` in all: a DataLoader takes them in turn."""
    return len(range(worker, consumed, workers))


class ShardStream(IterableDataset):
    """This process's part of the shards as an endless stream of encoded samples (one epoch after another)."""

    def __init__(self, folder: str | Path, encode: Callable[[Sample], Any], seed: int, buffer: int,
                 micro_batch: int, consumed_batches: int, rank: int = 0, num_processes: int = 1):
        self.shards = shard_paths(Path(folder))
        self.encode = encode  # Sample -> Encoded, or None for a sample to skip (counted by the caller's rules)
        self.seed, self.buffer, self.micro_batch = seed, buffer, micro_batch
        self.consumed_batches, self.rank, self.num_processes = consumed_batches, rank, num_processes

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # a new loader asks worker 0 first: it takes the part of the worker whose turn the next batch is
        worker = (worker + self.consumed_batches) % workers
        streams = self.num_processes * workers
        stream = self.rank * workers + worker
        if len(self.shards) < streams:
            raise RecordError(
                f"{len(self.shards)} shard(s) for {streams} streams ({self.num_processes} process(es) x {workers} "
                "worker(s)): write more, smaller shards (mmgpt data shard --shard-size) or use fewer workers"
            )
        skip = batches_from_worker(self.consumed_batches, worker, workers) * self.micro_batch
        for sample in self._samples(stream, streams):
            if skip:
                skip -= self.encode(sample, False) is not None  # text only: the same checks, no image decoded
                continue
            encoded = self.encode(sample, True)
            if encoded is not None:
                yield encoded

    def _samples(self, stream: int, streams: int) -> Iterator[Sample]:
        for epoch in count():
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(len(self.shards), generator=generator).tolist()
            mine = [self.shards[i] for i in order[stream::streams]]
            shuffle = random.Random(f"{self.seed}-{epoch}-{stream}")
            buffer: list[Sample] = []
            for shard in mine:
                for make_record, where in read_shard(shard):
                    buffer.append(parse_record(make_record(), None, where))
                    if len(buffer) >= self.buffer:
                        yield buffer.pop(shuffle.randrange(len(buffer)))
            shuffle.shuffle(buffer)
            yield from buffer

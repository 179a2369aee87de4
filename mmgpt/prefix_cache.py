"""The KV caches of conversations already read, so that a chat turn reads only what is new.

A turn's prompt is the previous turn's prompt plus the answer and the new message: the keys and values of that
shared prefix are already computed, and so are its images' features (they live in those keys and values). Each
entry is a prompt's key (token ids, with every image slot standing for that image's identity) and the decoder's
cache of it; a new prompt takes the entry sharing its longest prefix, cut back to that prefix, and the model reads
only the rest. The cut never falls inside an image's slot, so every image after it is encoded whole.
Entries are bounded in number and bytes; the least recently used go first.
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers.cache_utils import Cache, DynamicLayer

from mmgpt.images import ImageBytes


def image_identity(image: Any) -> str:
    """What tells two images apart without decoding them: a file's path, size and modification time, or a digest
    of the bytes of an in-memory or embedded image."""
    if isinstance(image, (str, Path)):
        path = Path(image).resolve()
        try:
            stat = os.stat(path)
        except OSError:
            return f"unreadable:{path}"  # loading it says why, in the image loader's words
        return f"file:{path}:{stat.st_size}:{stat.st_mtime_ns}"
    if isinstance(image, ImageBytes):
        return "bytes:" + hashlib.blake2b(image.data, digest_size=16).hexdigest()
    if isinstance(image, Image.Image):
        digest = hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest()
        return f"pil:{image.mode}:{image.size}:{digest}"
    raise TypeError(f"an image must be a path, bytes or a PIL image, got {type(image).__name__}")


def prompt_key(ids: list[int], images: list, image_start_id: int, image_end_id: int) -> list[Any]:
    """The prompt's ids with each image slot's tokens standing for that image (two pictures in the same place
    differ), for prefix matching."""
    key: list[Any] = list(ids)
    remaining = iter(images)
    identity = None
    for position, token in enumerate(ids):
        if token == image_start_id:
            identity = image_identity(next(remaining))
        if identity is not None:
            key[position] = (token, identity)
        if token == image_end_id:
            identity = None
    return key


def cache_bytes(cache: Cache) -> int:
    return sum(value.numel() * value.element_size() for layer in cache.layers for value in vars(layer).values()
               if torch.is_tensor(value))


@dataclass
class Entry:
    key: list[Any]  # of the tokens whose keys and values `cache` holds
    cache: Cache
    bytes: int
    prompt_length: int  # where the model's own answer begins in `key`


class PrefixCache:
    """Bounded store of (prompt key, KV cache) entries; thread-safe. No entry is ever extended while it is kept:
    `take` hands an entry over or gives a view of it."""

    def __init__(self, max_bytes: int, max_entries: int = 16):
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._next_id = 0

    @property
    def bytes(self) -> int:
        return sum(entry.bytes for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, key: list[Any], image_start_id: int, min_shared: int = 8) -> tuple[Cache | None, int]:
        """A cache holding the longest prefix `key` shares with a kept entry (at least `min_shared` tokens), and
        that prefix's length; (None, 0) if there is none. At least the last token is left to read, and the cut
        moves back to before an image slot it would split. An entry whose whole prompt `key` holds (the same
        conversation, one turn on) is handed over, cut to the shared prefix, to be extended and put back; of
        any other (a conversation that began alike, or this turn asked again) the caller gets a view cut to the
        shared prefix and the entry stays. Convolution and sliding-window states cannot be cut: those entries serve exact
        prefixes only."""
        with self._lock:
            best_id, best_length = None, 0
            for entry_id, entry in self._entries.items():
                length = _shared_prefix(entry.key, key)
                if length > best_length:
                    best_id, best_length = entry_id, length
            length = _outside_slots(key, min(best_length, len(key) - 1), image_start_id)
            if best_id is None or length < min_shared:
                return None, 0
            entry = self._entries[best_id]
            exact = length == len(entry.key)
            if not exact and not all(type(layer) is DynamicLayer for layer in entry.cache.layers):
                return None, 0
            if length >= entry.prompt_length:
                del self._entries[best_id]
            else:
                self._entries.move_to_end(best_id)
            return (entry.cache if exact else _prefix_view(entry.cache, length)), length

    def put(self, key: list[Any], cache: Cache, prompt_length: int) -> None:
        """Keep `cache`, which holds `key`'s tokens, the first `prompt_length` of them a prompt and the rest the
        model's answer; the least recently used entries go until the bounds hold."""
        size = cache_bytes(cache)
        if size > self.max_bytes:
            return
        with self._lock:
            self._entries[self._next_id] = Entry(key, cache, size, prompt_length)
            self._next_id += 1
            while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _prefix_view(cache: Cache, length: int) -> Cache:
    """A cache of the first `length` positions of `cache`, sharing its tensors: growing it concatenates into new
    tensors, so the original is never written."""
    view = copy.copy(cache)
    view.layers = []
    for layer in cache.layers:
        layer = copy.copy(layer)
        if layer.is_initialized:
            layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]
        view.layers.append(layer)
    return view


def _shared_prefix(a: list[Any], b: list[Any]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def _outside_slots(key: list[Any], length: int, image_start_id: int) -> int:
    """`length`, moved back to its image slot's start if the token there (the first one to read) is inside a slot."""
    while 0 < length and isinstance(key[length], tuple) and key[length][0] != image_start_id:
        length -= 1
    return length

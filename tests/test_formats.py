"""Formats users bring (LLaVA JSON, ShareGPT/OpenAI JSONL, Hugging Face datasets, webdataset caption shards) read
as the same samples as our JSONL, train through `mmgpt train`, convert to our JSONL, and fail with clear errors."""

import io
import json
import re
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmgpt.cli import main
from mmgpt.data.formats import read_jsonl, read_samples
from mmgpt.data.records import RecordError
from mmgpt.images import load_image

from conftest import TINY_OVERRIDES

QUESTIONS = [("What colour is the shape?", "red"), ("How many shapes are there?", "two")]


def our_chats(folder, second_image_last=True):
    """The reference: two one-image chats (the second's image after its question, as LLaVA sets have too) and a
    two-image chat, in our JSONL."""
    images = [f"images/{name}" for name in sorted(p.name for p in (folder / "images").iterdir())[:4]]
    records = [{"messages": [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": q}]},
                             {"role": "assistant", "content": a}]} for image, (q, a) in zip(images, QUESTIONS)]
    if second_image_last:
        records[1]["messages"][0]["content"].reverse()
    records.append({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image", "image": images[2]},
                                     {"type": "image", "image": images[3]}]},
        {"role": "assistant", "content": "same"}]})
    return records, images


def write_llava(folder, images, out):
    records = [{"id": str(i), "image": image, "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                                                {"from": "gpt", "value": a}]}
               for i, (image, (q, a)) in enumerate(zip(images, QUESTIONS))]
    records[1]["conversations"][0]["value"] = f"{QUESTIONS[1][0]}\n<image>"  # the placeholder at the end occurs too
    records.append({"id": "2", "image": images[2:4], "conversations": [
        {"from": "human", "value": "Compare<image><image>"}, {"from": "gpt", "value": "same"}]})
    out.write_text(json.dumps(records))


def write_sharegpt(folder, images, out):
    records = [{"messages": [{"role": "user", "content": f"<image>{q}"}, {"role": "assistant", "content": a}],
                "images": [image]} for image, (q, a) in zip(images, QUESTIONS)]
    records[1]["messages"][0]["content"] = f"{QUESTIONS[1][0]}<image>"
    records.append({"conversations": [{"from": "human", "value": "Compare<image><image>"},
                                      {"from": "gpt", "value": "same"}], "images": images[2:4]})
    out.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_hf(folder, images, out, layout):
    import datasets

    def image_value(path):
        return {"bytes": (folder / path).read_bytes(), "path": None}

    rows = []
    for image, (q, a) in zip(images, QUESTIONS):
        if layout == "cauldron":
            rows.append({"images": [image_value(image)], "texts": [{"user": q, "assistant": a, "source": "shapes"}]})
        else:
            rows.append({"images": [image_value(image)], "messages": [
                {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": q}]},
                {"role": "assistant", "content": [{"type": "text", "text": a}]}]})
    dataset = datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image()))
    if layout == "cauldron":
        dataset.save_to_disk(str(out))
    else:
        out.mkdir()
        dataset.to_parquet(str(out / "train-00000.parquet"))


def write_webdataset(folder, images, out):
    out.mkdir()
    with tarfile.open(out / "shard-000000.tar", "w") as archive:
        for index, image in enumerate(images[:3]):
            caption = ["a red square", "two circles", "a blue triangle"][index]
            members = {f"{index:06d}.png": (folder / image).read_bytes()}
            members[f"{index:06d}.txt" if index < 2 else f"{index:06d}.json"] = (
                caption if index < 2 else json.dumps({"caption": caption})).encode()
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def as_text(samples):
    """Roles and texts in order, images as their decoded pixels' checksum: what training sees."""
    return [[(turn.role, [segment.text if not segment.is_image else int(
        np.asarray(load_image(segment.image), dtype=np.int64).sum()) for segment in turn.segments]) for turn in sample.turns]
        for sample in samples]


@pytest.fixture
def reference(shapes_dir):
    records, images = our_chats(shapes_dir)
    path = shapes_dir / "reference.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return read_jsonl(path)[0], images


@pytest.mark.parametrize("kind", ["llava", "sharegpt"])
def test_conversation_formats_read_as_our_chats(shapes_dir, reference, kind, tmp_path):
    expected, images = reference
    out = tmp_path / ("llava.json" if kind == "llava" else "sharegpt.jsonl")
    (write_llava if kind == "llava" else write_sharegpt)(shapes_dir, images, out)
    samples, _ = read_samples(out, image_folder=str(shapes_dir))  # the format detected from the file
    assert as_text(samples) == as_text(expected)


@pytest.mark.parametrize("layout", ["cauldron", "trl"])
def test_hugging_face_datasets_saved_locally_read_as_our_chats(shapes_dir, reference, layout, tmp_path):
    _, images = reference
    records, _ = our_chats(shapes_dir, second_image_last=False)  # these layouts put the images first
    (tmp_path / "expected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    shutil.copytree(shapes_dir / "images", tmp_path / "images", dirs_exist_ok=True)
    write_hf(shapes_dir, images, tmp_path / layout, layout)
    samples, _ = read_samples(tmp_path / layout)
    assert as_text(samples) == as_text(read_jsonl(tmp_path / "expected.jsonl")[0])
    assert all(sample.images[0].name.startswith(f"{layout}:row") for sample in samples)  # named in errors


def test_webdataset_caption_shards_read_as_documents(shapes_dir, reference, tmp_path):
    _, images = reference
    write_webdataset(shapes_dir, images, tmp_path / "shards")
    samples, _ = read_samples(tmp_path / "shards")
    assert [s.is_chat for s in samples] == [False] * 3
    assert [s.turns[0].segments[1].text for s in samples] == ["a red square", "two circles", "a blue triangle"]
    assert load_image(samples[0].images[0]).size == Image.open(shapes_dir / images[0]).size


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llava", "sharegpt", "cauldron", "trl", "webdataset"])
def test_each_format_trains_through_mmgpt_train(shapes_dir, reference, kind, tmp_path):
    _, images = reference
    data = {"llava": tmp_path / "d.json", "sharegpt": tmp_path / "d.jsonl", "cauldron": tmp_path / "cauldron",
            "trl": tmp_path / "trl", "webdataset": tmp_path / "shards"}[kind]
    if kind in ("cauldron", "trl"):
        write_hf(shapes_dir, images, data, kind)
    else:
        {"llava": write_llava, "sharegpt": write_sharegpt, "webdataset": write_webdataset}[kind](shapes_dir, images, data)
    code = main(["train", "configs/tiny-shapes.yaml", "--set", *TINY_OVERRIDES, f"data.train={data}", "data.eval=",
                 f"data.image_folder={shapes_dir if kind in ('llava', 'sharegpt') else ''}", "train.batch_size=2",
                 "train.max_steps=2", "train.num_workers=0", f"output_dir={tmp_path / 'run'}"])
    assert code == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)


def test_convert_writes_our_jsonl_that_reads_back_the_same(shapes_dir, reference, tmp_path, capsys):
    expected, images = reference
    write_llava(shapes_dir, images, tmp_path / "llava.json")
    assert main(["data", "convert", str(tmp_path / "llava.json"), "--image-folder", str(shapes_dir),
                 "--out", str(tmp_path / "out" / "train.jsonl")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert as_text(read_jsonl(tmp_path / "out" / "train.jsonl")[0]) == as_text(expected)
    write_hf(shapes_dir, images, tmp_path / "cauldron", "cauldron")  # embedded images are written out as files
    assert main(["data", "convert", str(tmp_path / "cauldron"), "--out", str(tmp_path / "out2" / "train.jsonl")]) == 0
    assert as_text(read_jsonl(tmp_path / "out2" / "train.jsonl")[0]) == as_text(read_samples(tmp_path / "cauldron")[0])
    assert len(list((tmp_path / "out2" / "images").glob("*.png"))) == 2


@pytest.mark.parametrize("record, cause", [
    ({"image": "images/eval000000.png", "conversations": [{"from": "human", "value": "no placeholder"},
                                                          {"from": "gpt", "value": "x"}]}, "1 image(s) but 0 <image>"),
    ({"image": "images/eval000000.png", "conversations": [{"from": "human", "value": "<image><image>"},
                                                          {"from": "gpt", "value": "x"}]}, "more <image> placeholders"),
    ({"image": "../outside.png", "conversations": [{"from": "human", "value": "<image>"},
                                                   {"from": "gpt", "value": "x"}]}, "outside the data folder"),
    ({"image": "images/eval000000.png", "conversations": [{"from": "robot", "value": "<image>"}]}, "unknown speaker"),
])
def test_bad_foreign_records_name_file_record_and_cause(shapes_dir, tmp_path, record, cause):
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    path = tmp_path / "data.json"
    path.write_text(json.dumps([good, record]))
    with pytest.raises(RecordError, match=f"data.json record 1\\b.*{re.escape(cause)}"):
        read_samples(path, image_folder=str(shapes_dir))
    samples, skipped = read_samples(path, image_folder=str(shapes_dir), skip_bad=True)
    assert len(samples) == 1 and len(skipped) == 1 and "record 1" in skipped[0]


def test_unknown_or_undetectable_format_is_a_clear_error_listing_the_known_ones(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(RecordError, match="cannot tell its data format.*jsonl, llava, hf, webdataset"):
        read_samples(tmp_path / "notes.csv")
    with pytest.raises(RecordError, match="unknown data format 'parquet'; known: jsonl, llava, hf, webdataset"):
        read_samples(tmp_path / "notes.csv", format="parquet")


def test_webdataset_key_without_caption_is_named(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as archive:
        data = io.BytesIO()
        Image.new("RGB", (4, 4)).save(data, "PNG")
        info = tarfile.TarInfo("k1.png")
        info.size = len(data.getvalue())
        archive.addfile(info, io.BytesIO(data.getvalue()))
    with pytest.raises(RecordError, match="s.tar key k1: no caption"):
        read_samples(tmp_path / "s.tar")

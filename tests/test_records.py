import json

import pytest

from mmgpt.data.formats import read_jsonl
from mmgpt.data.records import RecordError


def write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def image(tmp_path, name="a.png"):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    return name


@pytest.mark.parametrize(
    "record, cause",
    [
        ("{not json", "malformed JSON"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": ""}]}, "empty content"),
        ({"content": [{"type": "video", "video": "x.mp4"}]}, "type 'text' or 'image'"),
        ({"content": [{"type": "image", "image": "../outside.png"}]}, "outside the data folder"),
        ({"content": [{"type": "image", "image": "missing.png"}]}, "file not found"),
        ({"text": "neither"}, "needs 'messages'"),
    ],
)
def test_bad_record_error_names_file_line_and_cause(tmp_path, record, cause):
    good = {"content": [{"type": "image", "image": image(tmp_path)}, {"type": "text", "text": "ok"}]}
    path = write(tmp_path, [good, record])
    with pytest.raises(RecordError) as raised:
        read_jsonl(path)
    assert "data.jsonl line 2" in str(raised.value)
    assert cause in str(raised.value)


def test_skip_bad_records_counts_what_it_skips(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write(tmp_path, [good, "{broken", good, {"messages": [{"role": "x", "content": "a"}]}])
    samples, skipped = read_jsonl(path, skip_bad=True)
    assert len(samples) == 2
    assert len(skipped) == 2 and "line 2" in skipped[0] and "line 4" in skipped[1]


def test_image_paths_resolve_relative_to_the_jsonl_file(tmp_path):
    (tmp_path / "sub").mkdir()
    image(tmp_path / "sub", "b.png")
    path = write(tmp_path / "sub", [{"content": [{"type": "image", "image": "b.png"}]}])
    samples, _ = read_jsonl(path)
    assert samples[0].images == [(tmp_path / "sub" / "b.png").resolve()]
    assert not samples[0].is_chat

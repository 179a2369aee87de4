import pytest

from mmgpt.config import ConfigError, load_config
from mmgpt.data.loader import batch_indices


def test_yaml_then_dotted_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\ntrain:\n  lr: 1e-3\n  batch_size: 8\nmodel:\n  vision:\n    kwargs: {depth: 2}\n")
    config = load_config(path, ["train.batch_size=16", "model.vision.kwargs.img_size=32", "train.mixed_precision=no"])
    assert config.seed == 3 and config.train.lr == 0.001 and config.train.batch_size == 16
    assert config.model.vision.kwargs == {"depth": 2, "img_size": 32}
    assert config.train.mixed_precision == "no"
    assert load_config(None, ["model.vision.conv_stem_depth=[1, 2, 2]"]).model.vision.conv_stem_depth == [1, 2, 2]
    assert load_config(None, ["model.vision.conv_stem_depth=2"]).model.vision.conv_stem_depth == 2


@pytest.mark.parametrize("override, message", [
    ("train.lrate=1", "unknown config key 'train.lrate'"),
    ("nothing.here=1", "unknown config key 'nothing'"),
    ("train.max_steps=many", "'train.max_steps' expects int"),
    ("train.lr=fast", "'train.lr' expects a number"),
    ("train=3", "'train' is a section"),
    ("train.batch_size=0", "'train.batch_size' must be at least 1, got 0"),
    ("train.batch_size=-4", "'train.batch_size' must be at least 1, got -4"),
    ("train.max_steps=0", "'train.max_steps' must be at least 1, got 0"),
    ("train.lr=-1e-3", r"'train.lr' must be 0 or more, got -0.001"),
    ("train.mixed_precision=fp8", "'train.mixed_precision' must be one of auto, bf16, fp16, no, got 'fp8'"),
    ("train.min_lr_ratio=2", "'train.min_lr_ratio' must be between 0 and 1"),
    ("train.lr_multipliers.vision=-2", "'train.lr_multipliers.vision' must be a number, 0 or more"),
    ("model.vision.conv_stem_depth=[1,0,2]", r"'model.vision.conv_stem_depth' must be at least 1, or a list"),
    ("model.vision.conv_stem_depth=[]", r"'model.vision.conv_stem_depth' must be at least 1, or a list"),
    ("model.vision.conv_stem_depth=deep", "'model.vision.conv_stem_depth' expects int or list, got 'deep'"),
])
def test_bad_override_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  trian: x.jsonl\n")
    with pytest.raises(ConfigError, match="unknown config key 'data.trian'"):
        load_config(path)


def test_batch_order_is_seeded_complete_and_length_grouped():
    lengths = tuple((i * 37) % 101 for i in range(64))
    epoch = [batch_indices(lengths, 4, seed=1, step=m) for m in range(16)]
    assert sorted(i for batch in epoch for i in batch) == list(range(64))
    assert epoch == [batch_indices(lengths, 4, seed=1, step=m) for m in range(16)]
    assert epoch != [batch_indices(lengths, 4, seed=2, step=m) for m in range(16)]
    assert batch_indices(lengths, 4, 1, 16) != epoch[0] or batch_indices(lengths, 4, 1, 17) != epoch[1]
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch) / len(epoch)
    assert spread < 20  # random batches of 4 would spread ~60


@pytest.mark.parametrize("override, message", [
    ("model.text.config.n_layerz=9", r"'model.text.config.n_layerz': GPT2Config has no such setting \(did you mean n_layer"),
    ("model.text.config.model_type=gpt9", "'model.text.config.model_type': transformers has no decoder type 'gpt9'"),
    ("model.vision.kwargs.bogus=1", "timm's 'vit_tiny_patch16_224' cannot be built with the vision kwargs .*'bogus'"),
])
def test_typos_inside_the_model_sections_are_errors_naming_the_key(override, message):
    from mmgpt.build import build

    config = load_config(None, ["model.vision.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
                                "model.text.config={model_type: gpt2, n_layer: 1, n_embd: 32, n_head: 2}", override])
    with pytest.raises(ValueError, match=message):
        build(config.model, ["some training text"] * 8)

import pytest
import torch
from PIL import Image

from mmgpt import MMGPT, MMGPTForConditionalGeneration
from mmgpt.data.collate import collate
from mmgpt.data.records import parse_record


def prompt(processor, text="What colour is the circle?", colour=(255, 0, 0)):
    sample = parse_record({"messages": [{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (32, 32), colour)}, {"type": "text", "text": text}]}]})
    return collate([processor.encode(sample, add_generation_prompt=True)], processor.special.pad, "left")


def inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def test_save_then_load_gives_identical_logits(tiny, tmp_path):
    processor, model = tiny
    batch = prompt(processor)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = MMGPT.from_pretrained(tmp_path, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**inputs(batch)).logits, model(**inputs(batch)).logits, rtol=0, atol=0)
    assert loaded.processor.special == processor.special
    assert loaded.processor.num_image_tokens == processor.num_image_tokens


def test_greedy_generation_with_kv_cache_equals_without(tiny):
    processor, model = tiny
    batch = inputs(prompt(processor))
    with torch.no_grad():
        cached = model.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=True, min_new_tokens=12)
        uncached = model.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=False, min_new_tokens=12)
    assert cached.shape[1] == batch["input_ids"].shape[1] + 12
    assert torch.equal(cached, uncached)


def test_image_features_are_computed_once_per_prompt(tiny):
    processor, model = tiny
    calls = []
    handle = model.vision.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            model.generate(**inputs(prompt(processor)), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_batched_left_padded_generation_equals_one_by_one(tiny):
    processor, model = tiny
    api = MMGPT(model, processor)
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (32, 32), c)},
                                      {"type": "text", "text": t}]}]
        for c, t in [((255, 0, 0), "hi"), ((0, 0, 255), "a longer question about the picture, with many words")]
    ]
    batched = api.generate(conversations, max_new_tokens=8)
    single = [api.generate([c], max_new_tokens=8)[0] for c in conversations]
    assert batched == single


@pytest.mark.parametrize("images", [0, 2])
def test_image_count_mismatch_is_a_clear_error(tiny, images):
    processor, model = tiny
    batch = inputs(prompt(processor))
    batch["pixel_values"] = batch["pixel_values"].repeat(images, 1, 1, 1) if images else None
    with pytest.raises(ValueError, match=f"1 images of {processor.num_image_tokens} tokens.*but {images} images"):
        model(**batch)


def test_pretrained_parts_load_from_local_paths(tmp_path):
    """The real-recipe path: a timm weights file and a transformers decoder folder, both on disk."""
    import timm
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mmgpt.build import build
    from mmgpt.config import ModelConfig, TextConfig, VisionConfig

    vision_kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **vision_kwargs)
    save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    decoder = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=95, n_positions=128))
    decoder.save_pretrained(tmp_path / "gpt2")
    vocab = {chr(i): i - 33 for i in range(33, 127)} | {"<|endoftext|>": 94}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    GPT2TokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(tmp_path / "gpt2")

    config = ModelConfig(
        vision=VisionConfig(pretrained=str(tmp_path / "vit.safetensors"), kwargs=vision_kwargs),
        text=TextConfig(pretrained=str(tmp_path / "gpt2")),
    )
    processor, model = build(config, [])
    torch.testing.assert_close(model.vision.vit.state_dict()["blocks.0.attn.qkv.weight"], vit.state_dict()["blocks.0.attn.qkv.weight"])
    torch.testing.assert_close(
        model.language_model.transformer.h[0].attn.c_attn.weight, decoder.transformer.h[0].attn.c_attn.weight
    )
    assert model.get_input_embeddings().num_embeddings == len(processor.tokenizer) == 95 + 10  # control and tool tokens + pad added
    assert model.config.image_token_id == processor.special.image
    model.eval()
    with torch.no_grad():
        out = model(**inputs(prompt(processor)))
    assert out.logits.shape[-1] == model.get_input_embeddings().num_embeddings


def test_registered_with_auto_classes(tiny, tmp_path):
    from transformers import AutoModelForImageTextToText

    _, model = tiny
    model.save_pretrained(tmp_path)
    assert isinstance(AutoModelForImageTextToText.from_pretrained(tmp_path), MMGPTForConditionalGeneration)


def test_gpu_recipe_loads_its_parts_through_local_stand_ins(tmp_path):
    """configs/siglip-gpt2-*.yaml: the same config keys, pointed at tiny local files instead of the hub."""
    import timm
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mmgpt.build import build
    from mmgpt.config import load_config
    from pathlib import Path

    tiny_vit = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    vit = timm.create_model("vit_base_patch16_siglip_224", num_classes=0, **tiny_vit)
    save_file(vit.state_dict(), tmp_path / "siglip.safetensors")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=128)).save_pretrained(tmp_path / "gpt2")
    backend = Tokenizer(models.BPE(vocab={chr(i): i - 33 for i in range(33, 127)} | {"<|endoftext|>": 94}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    GPT2TokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(tmp_path / "gpt2")

    configs = Path(__file__).resolve().parents[1] / "configs"
    stage1 = load_config(configs / "siglip-gpt2-stage1.yaml", [
        f"model.vision.pretrained={tmp_path / 'siglip.safetensors'}", f"model.text.pretrained={tmp_path / 'gpt2'}",
        "model.vision.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}"])
    assert stage1.train.freeze == ["vision", "language_model"]
    processor, model = build(stage1.model, [])
    torch.testing.assert_close(model.vision.vit.state_dict()["patch_embed.proj.weight"], vit.state_dict()["patch_embed.proj.weight"])
    assert model.num_image_tokens == 16 // 4  # 4x4 patches, pixel shuffle 2
    model.save_pretrained(tmp_path / "stage1")
    processor.save_pretrained(tmp_path / "stage1")

    stage2 = load_config(configs / "siglip-gpt2-stage2.yaml", [f"model.init_from={tmp_path / 'stage1'}"])
    processor2, model2 = build(stage2.model, [])
    assert processor2.special == processor.special
    torch.testing.assert_close(model2.projector.mlp[0].weight, model.projector.mlp[0].weight)


def test_average_pool_projector_from_config_to_saved_model(shapes_dir, tmp_path):
    """model.projector_pool_size 1: one token per image, the mean of its patch features (so moving the content moves
    nothing), kept through save and load; 2 averages each quadrant; pool and shuffle together are an error."""
    from mmgpt.build import build
    from mmgpt.projector import average_pool
    from conftest import tiny_config

    config = tiny_config(shapes_dir, tmp_path, "model.projector_shuffle_factor=1", "model.projector_pool_size=1")
    processor, model = build(config.model, ["a red circle"])
    assert model.num_image_tokens == 1 and processor.num_image_tokens == 1
    features = torch.randn(2, model.vision.num_patches, model.vision.width)
    rolled = features.roll(shifts=5, dims=1)  # the same patches in other places
    torch.testing.assert_close(model.projector(features), model.projector(rolled))
    model.save_pretrained(tmp_path / "saved")
    assert MMGPTForConditionalGeneration.from_pretrained(tmp_path / "saved").num_image_tokens == 1

    grid = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 grid, patch i holds the value i
    assert average_pool(grid, (4, 4), 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # e.g. mean of 0, 1, 4, 5
    with pytest.raises(ValueError, match="either an average pool or a pixel shuffle"):
        build(tiny_config(shapes_dir, tmp_path, "model.projector_shuffle_factor=2", "model.projector_pool_size=1").model, [])


def test_grid_embedding_marks_each_token_with_its_row_and_column_and_is_saved(shapes_dir, tmp_path):
    """model.projector_grid_embedding: the same content in two tokens differs by their row and column embeddings
    (shared along rows and columns), and the embeddings train and come back from a saved model."""
    from mmgpt.build import build
    from conftest import tiny_config

    config = tiny_config(shapes_dir, tmp_path, "model.projector_shuffle_factor=2", "model.projector_grid_embedding=true")
    _, model = build(config.model, ["a red circle"])
    projector = model.projector
    rows, columns = (side // 2 for side in model.vision.grid_size)
    assert projector.row_embedding.shape[0] == rows and projector.column_embedding.shape[1] == columns
    same = torch.randn(1, 1, model.vision.width).expand(1, model.vision.num_patches, -1)
    tokens = projector(same).reshape(rows, columns, -1)
    torch.testing.assert_close(tokens[0, 1] - tokens[0, 0], projector.column_embedding[0, 1] - projector.column_embedding[0, 0])
    torch.testing.assert_close(tokens[1, 0] - tokens[0, 0], projector.row_embedding[1, 0] - projector.row_embedding[0, 0])
    tokens.sum().backward()
    assert projector.row_embedding.grad.abs().sum() > 0 and projector.column_embedding.grad.abs().sum() > 0
    model.save_pretrained(tmp_path / "saved")
    loaded = MMGPTForConditionalGeneration.from_pretrained(tmp_path / "saved").projector
    torch.testing.assert_close(loaded.row_embedding, projector.row_embedding)
    assert build(tiny_config(shapes_dir, tmp_path).model, [])[1].projector.row_embedding is None


def test_projector_norm_keeps_image_tokens_at_one_scale_and_the_grid_beside_it(shapes_dir, tmp_path):
    """model.projector_norm: however large the vision features, image tokens come out at the LayerNorm's scale,
    so a grid embedding added after it keeps its share; a saved model keeps the learnt gain."""
    from mmgpt.build import build
    from conftest import tiny_config

    config = tiny_config(shapes_dir, tmp_path, "model.projector_norm=true")
    _, model = build(config.model, ["a red circle"])
    features = torch.randn(3, model.vision.num_patches, model.vision.width)
    width = model.projector.norm.normalized_shape[0]
    for scale in (10, 1000):
        torch.testing.assert_close(model.projector(scale * features).norm(dim=-1).mean().item(), width**0.5, rtol=0.01, atol=0)
    with torch.no_grad():
        model.projector.norm.weight.mul_(3)
    model.save_pretrained(tmp_path / "saved")
    loaded = MMGPTForConditionalGeneration.from_pretrained(tmp_path / "saved").projector
    torch.testing.assert_close(loaded(100 * features).norm(dim=-1).mean().item(), 3 * width**0.5, rtol=0.01, atol=0)

    gridded = tiny_config(shapes_dir, tmp_path, "model.projector_norm=true", "model.projector_grid_embedding=true")
    projector = build(gridded.model, [])[1].projector
    grid = (projector.row_embedding + projector.column_embedding).flatten(0, 1)
    for scale in (10, 1e4):
        content = projector(scale * features) - grid
        torch.testing.assert_close(content.norm(dim=-1).mean().item(), width**0.5, rtol=0.01, atol=0)
    assert build(tiny_config(shapes_dir, tmp_path).model, [])[1].projector.norm is None


DECODERS = {
    "gpt2": "{model_type: gpt2, n_layer: 2, n_embd: 32, n_head: 2, n_positions: 256, resid_pdrop: 0.0, embd_pdrop: 0.0, "
            "attn_pdrop: 0.0}",
    "llama": "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
             "num_key_value_heads: 1, max_position_embeddings: 256}",
    "lfm2": "{model_type: lfm2, hidden_size: 32, intermediate_size: 64, block_auto_adjust_ff_dim: false, "
            "num_hidden_layers: 2, layer_types: [conv, full_attention], num_attention_heads: 2, num_key_value_heads: 2, "
            "max_position_embeddings: 256}",
    "qwen2": "{model_type: qwen2, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
             "num_key_value_heads: 1, max_position_embeddings: 256}",
}


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("num_items", [None, 37])
def test_loss_from_labelled_positions_only_equals_the_decoders_own(shapes_dir, tmp_path, monkeypatch, decoder, num_items):
    """Chats padded to one length, most positions unlabelled: the same loss and the same gradients as the decoder's
    loss over every position."""
    from conftest import tiny_config
    from mmgpt import modeling
    from mmgpt.build import build

    torch.manual_seed(0)
    config = tiny_config(shapes_dir, tmp_path, f"model.text.config={DECODERS[decoder]}")
    processor, model = build(config.model, ["a red circle and a blue square"] * 20)
    chats = [[("What colour is the circle?", "red"), ("And the square?", "blue, like the sea")],
             [("How many shapes?", "two")]]
    samples = [parse_record({"messages": [message for question, answer in chat for message in (
        {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (32, 32), (200, 30, 30))},
                                     {"type": "text", "text": question}]},
        {"role": "assistant", "content": answer})]}) for chat in chats]
    batch = collate([processor.encode(sample) for sample in samples], processor.special.pad)
    assert (batch["labels"] != -100).float().mean() < 0.5

    def loss_and_grads():
        model.zero_grad()
        loss = model(**batch, num_items_in_batch=num_items).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    assert model._plain_head
    fast_loss, fast_grads = loss_and_grads()
    monkeypatch.setattr(modeling, "PLAIN_HEAD_DECODERS", frozenset())
    assert not model._plain_head
    full_loss, full_grads = loss_and_grads()
    torch.testing.assert_close(fast_loss, full_loss, rtol=1e-6, atol=1e-6)
    assert fast_grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(fast_grads[name], full_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("decoder", ["gpt2", "llama", "qwen2"])
def test_packed_samples_see_only_themselves(shapes_dir, tmp_path, decoder):
    """Samples packed end to end in rows: each sample's logits are the ones it gets alone, and the loss and the
    gradients are the padded batch's."""
    from conftest import tiny_config
    from mmgpt.build import build
    from mmgpt.data.collate import pack

    torch.manual_seed(0)
    processor, model = build(tiny_config(shapes_dir, tmp_path, f"model.text.config={DECODERS[decoder]}").model,
                             ["a red circle and a blue square"] * 20)
    image = {"type": "image", "image": Image.new("RGB", (32, 32), (200, 30, 30))}
    records = [{"messages": [{"role": "user", "content": [image, {"type": "text", "text": "What colour is the circle? " * 6}]},
                             {"role": "assistant", "content": "red"}]},
               {"messages": [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": "two"}]},
               {"content": [{"type": "text", "text": "a blue square"}, image]},
               {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "And?"}]},
                             {"role": "assistant", "content": "a red circle"}]}]
    encoded = [processor.encode(parse_record(record)) for record in records]
    packed, padded = pack(encoded, processor.special.pad), collate(encoded, processor.special.pad)
    assert packed["input_ids"].shape[0] < len(encoded) and "attention_mask" not in packed

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                       pixel_values=packed["pixel_values"], use_cache=False).logits  # a cache turns packing off
        found = 0
        for row, positions in enumerate(packed["position_ids"]):
            starts = [*(positions == 0).nonzero().flatten().tolist(), len(positions)]
            for start, end in zip(starts, starts[1:]):
                ids = packed["input_ids"][row, start:end].tolist()
                matches = [sample for sample in encoded if sample.input_ids == ids]
                if not matches:
                    continue  # the padding at the row's end
                alone = model(**inputs(collate(matches[:1], processor.special.pad))).logits[0]
                torch.testing.assert_close(logits[row, start:end], alone, rtol=1e-5, atol=1e-5)
                found += 1
        assert found == len(encoded)

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch, num_items_in_batch=17).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model.train()
    packed_loss, packed_grads = loss_and_grads(packed)
    padded_loss, padded_grads = loss_and_grads(padded)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_conv_stem_depth_widens_what_a_patch_sees_and_is_saved(shapes_dir, tmp_path):
    """model.vision.conv_stem_depth 2: a pixel in column 18 reaches the first patch's embedding (columns 0-7; one
    convolution a stage sees up to column 7, two up to column 21). Per stage, the extra convolution widens most in
    the coarsest stage: [1, 2, 2] sees up to column 19, [2, 2, 1] up to 13. The patch grid is the same, and a saved
    model comes back with its stem."""
    from mmgpt.build import build
    from conftest import tiny_config

    def patch_embeddings(depth) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
        config = tiny_config(shapes_dir, tmp_path, "model.vision.conv_stem=true", f"model.vision.conv_stem_depth={depth}")
        model = build(config.model, ["a red circle"])[1].eval()
        pixels = torch.zeros(1, 3, 32, 32)
        nudged = pixels.clone()
        nudged[..., 3, 18] = 1.0
        embed = model.vision.vit.patch_embed
        return model, embed(pixels)[0, 0], embed(nudged)[0, 0]

    def convolutions(model: torch.nn.Module) -> int:
        return sum(isinstance(m, torch.nn.Conv2d) for m in model.vision.vit.patch_embed.modules())

    narrow, before, after = patch_embeddings(1)
    torch.testing.assert_close(before, after)
    fine_first, before, after = patch_embeddings([2, 2, 1])
    torch.testing.assert_close(before, after)
    for depth in (2, [1, 2, 2]):
        wide, before, after = patch_embeddings(depth)
        assert not torch.allclose(before, after)
        assert wide.vision.grid_size == narrow.vision.grid_size
        wide.save_pretrained(tmp_path / "saved")
        loaded = MMGPTForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
        torch.testing.assert_close(loaded.vision.vit.patch_embed(torch.ones(1, 3, 32, 32)),
                                   wide.vision.vit.patch_embed(torch.ones(1, 3, 32, 32)))
    assert convolutions(narrow) == 4 and convolutions(fine_first) == 6 and convolutions(wide) == 6  # the 1x1 projection
    config = tiny_config(shapes_dir, tmp_path, "model.vision.conv_stem=true", "model.vision.conv_stem_depth=[1, 2]")
    with pytest.raises(ValueError, match=r"conv_stem_depth \[1, 2\] names 2 stages, but a stem for patch size 8 has 3"):
        build(config.model, ["a red circle"])

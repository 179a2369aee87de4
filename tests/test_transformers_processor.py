"""A saved model works with transformers' own entry points: `AutoProcessor` + `apply_chat_template` give the ids
and pixels mmgpt gives, and `generate()` stops at the end of a turn from the saved generation config alone."""

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import tiny_config
from mmgpt import MMGPT, MMGPTTransformersProcessor
from mmgpt.build import build


def test_auto_processor_and_chat_template_make_mmgpts_inputs_and_generate_stops_at_the_turns_end(shapes_dir, tmp_path):
    torch.manual_seed(0)
    processor, model = build(tiny_config(shapes_dir, tmp_path).model, ["a red circle and a blue square"] * 20)
    decoder = model.language_model
    with torch.no_grad():  # a decoder whose every answer is <|end|>: a constant last hidden state, one row scoring it
        decoder.transformer.ln_f.weight.zero_()
        decoder.transformer.ln_f.bias.normal_()
        decoder.lm_head.weight.zero_()
        decoder.lm_head.weight[processor.special.end] = decoder.transformer.ln_f.bias
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")

    auto = AutoProcessor.from_pretrained(tmp_path / "saved")
    assert isinstance(auto, MMGPTTransformersProcessor)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (50, 40), (200, 30, 30))},
                                             {"type": "text", "text": "What colour is the circle?"}]},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": [{"type": "text", "text": "And this one?"},
                                             {"type": "image", "image": Image.new("RGB", (20, 60), (0, 90, 255))}]}]
    inputs = auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    prompt = MMGPT(model, processor).prompt(messages, 8)
    assert inputs["input_ids"][0].tolist() == prompt.ids
    torch.testing.assert_close(inputs["pixel_values"], processor.pixel_values(prompt.images), rtol=0, atol=1e-6)

    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved").eval()
    output = loaded.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert output[0, len(prompt.ids) :].tolist() == [processor.special.end]

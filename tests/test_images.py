"""Every oddity of real image files is handled (checked by pixel values) or refused with a clear error."""

import io

import numpy as np
import pytest
from PIL import Image

from mmgpt.images import ImageError, ImageTransform, load_image


def saved(tmp_path, image, name, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_truncated_file_is_refused(tmp_path):
    path = saved(tmp_path, Image.new("RGB", (64, 64), "red"), "full.png")
    (tmp_path / "cut.png").write_bytes(path.read_bytes()[:60])
    with pytest.raises(ImageError, match="cut.png' cannot be read"):
        load_image(tmp_path / "cut.png")


def test_text_file_named_png_is_refused(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(ImageError, match="notes.png' cannot be read"):
        load_image(tmp_path / "notes.png")


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = saved(tmp_path, Image.new("L", (400, 400)), "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(ImageError, match="big.png' is too large"):
        load_image(path)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert load_image(path).getpixel((4, 4)) == (255, 0, 0)


def test_sixteen_bit_png_is_scaled_not_clamped(tmp_path):
    values = np.full((4, 4), 32768, dtype=np.uint16)
    path = saved(tmp_path, Image.fromarray(values), "deep.png")
    assert Image.open(path).mode.startswith("I")
    assert load_image(path).getpixel((1, 1)) == (128, 128, 128)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = saved(tmp_path, Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "cmyk.jpg")
    red, green, blue = load_image(path).getpixel((4, 4))
    assert red > 200 and green < 60 and blue < 60


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 1)
    path = saved(tmp_path, image, "pal.png", transparency=0)
    loaded = load_image(path)
    assert loaded.getpixel((0, 0)) == (255, 0, 0)
    assert loaded.getpixel((2, 2)) == (255, 255, 255)


@pytest.mark.parametrize("mode, colour", [("RGBA", (0, 0, 255, 0)), ("LA", (0, 0))])
def test_transparent_pixels_become_white(tmp_path, mode, colour):
    path = saved(tmp_path, Image.new(mode, (4, 4), colour), f"alpha-{mode}.png")
    assert load_image(path).getpixel((1, 1)) == (255, 255, 255)


def test_half_transparent_red_is_blended_with_white(tmp_path):
    path = saved(tmp_path, Image.new("RGBA", (4, 4), (255, 0, 0, 128)), "half.png")
    red, green, blue = load_image(path).getpixel((1, 1))
    assert red == 255 and 120 <= green <= 130 and green == blue


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left of a landscape picture
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = saved(tmp_path, image, "rotated.jpg", exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    red, green, _ = loaded.getpixel((10, 3))  # the red strip is now along the top
    assert red > 200 and green < 60


@pytest.mark.parametrize("size", [(1, 1), (1, 4000), (4000, 1)])
def test_extreme_aspect_ratios_transform_to_the_model_size(tmp_path, size):
    path = saved(tmp_path, Image.new("RGB", size, (0, 255, 0)), f"thin-{size[0]}x{size[1]}.png")
    transform = ImageTransform(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    pixels = transform(load_image(path))
    assert pixels.shape == (3, 32, 32)
    assert pixels[1].min() > 0.99 and pixels[0].max() < -0.99  # green everywhere, normalised to +1 / -1


def test_pil_image_passes_through(tmp_path):
    image = Image.open(io.BytesIO(saved(tmp_path, Image.new("L", (3, 3), 200), "grey.png").read_bytes()))
    assert load_image(image).getpixel((1, 1)) == (200, 200, 200)

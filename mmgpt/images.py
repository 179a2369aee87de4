"""Image files -> RGB PIL images -> normalised pixel tensors, with every oddity of real files handled or refused."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F


class ImageError(ValueError):
    """An image that cannot be used; the message names the image and the cause."""


@dataclass(frozen=True)
class ImageBytes:
    """An encoded image that lives inside another file (a tar shard, a parquet row): its bytes, and a name for errors."""

    data: bytes
    name: str


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16/32-bit greyscale scaled (not clamped), alpha composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(image: str | Path | Image.Image | ImageBytes, max_pixels: int | None = None) -> Image.Image:
    """Open (first frame of an animation), apply EXIF orientation, convert to RGB. Raises `ImageError`.

    `max_pixels` refuses a larger image from its header alone, before a byte of it is decoded: a small file can
    hold a huge picture (a 0.27 MB PNG of 9000x9000 decodes to 243 MB of RGB).
    """
    if isinstance(image, ImageBytes):
        name, source = image.name, io.BytesIO(image.data)
    else:
        name = getattr(image, "filename", None) or (str(image) if not isinstance(image, Image.Image) else "<image>")
        source = image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = source if isinstance(source, Image.Image) else Image.open(source)
            width, height = opened.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageError(f"image '{name}' is {width}x{height} pixels ({width * height / 1e6:.1f} Mpx); "
                                 f"the limit is {max_pixels / 1e6:.0f} Mpx")
            if getattr(opened, "n_frames", 1) > 1:
                opened.seek(0)
            opened.load()
            oriented = ImageOps.exif_transpose(opened)
            return _to_rgb(oriented)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"image '{name}' is too large: {error}") from None
    except FileNotFoundError:
        raise ImageError(f"image '{name}': file not found") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"image '{name}' cannot be read: {error}") from None


@dataclass
class ImageTransform:
    """Resize to the ViT's input size and normalise with its mean and std (from timm's data config)."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = F.to_dtype(self._resized(image), torch.float32, scale=True)
        return F.normalize(pixels, list(self.mean), list(self.std))  # (3, H, W)

    def small(self, image: Image.Image) -> Image.Image:
        """The image at the ViT's input size, still 8-bit: what a chat keeps of a picture instead of the picture.
        Transforming it gives exactly the pixels that transforming the original gives (resizing to the size an
        image already has leaves it as it is)."""
        return F.to_pil_image(self._resized(image))

    def _resized(self, image: Image.Image) -> torch.Tensor:
        pixels = F.to_image(image)  # (3, H, W) uint8
        return F.resize(pixels, list(self.size), interpolation=InterpolationMode(self.interpolation), antialias=True)

"""Turn one source image into the stored form: square, `image_size`², L or RGB, lossless PNG.

Every problem with an input is raised as `BadImage(reason, detail)` with a reason code from
`REASONS`, so that `prepare` can count skipped files by reason instead of crashing.
This module stays light (PIL + numpy only): it is imported by every decode process.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

ZERO_BYTES = "zero_bytes"
UNREADABLE = "unreadable"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large"  # more pixels than PIL's bomb limit, or more bytes than MAX_SOURCE_BYTES
UNSAFE_NAME = "unsafe_name"  # an archive member named outside the archive (../x, /x)
REASONS = (ZERO_BYTES, UNREADABLE, NOT_AN_IMAGE, TRUNCATED, CORRUPT, TOO_SMALL, TOO_LARGE,
           UNSAFE_NAME)
# One source image, encoded; a larger archive member is skipped unread (a zip bomb expands to
# gigabytes from kilobytes). PIL's own pixel limit guards the decode.
MAX_SOURCE_BYTES = 128 << 20

# A truncated file must be reported, not silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# A fixed zlib level is deterministic for a given zlib; `optimize` would try filters, also
# deterministic, but slower for no gain at these sizes.
_PNG_OPTIONS = {"compress_level": 6, "optimize": False}


class BadImage(Exception):  # noqa: N818 - a reason, not a crash
    """An input that cannot become a sample; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class PreparedImage:
    """A sample ready for a shard, plus what the manifest and the pixel statistics need."""

    png: bytes
    sha256: str
    width: int  # original, after EXIF orientation
    height: int
    pixel_sum: tuple[float, ...]  # per channel, pixels scaled to [0, 1]
    pixel_sq_sum: tuple[float, ...]
    pixel_count: int  # pixels per channel


def decode(data: bytes) -> Image.Image:
    """Decode encoded image bytes (first frame for animations) or raise `BadImage`."""
    if not data:
        raise BadImage(ZERO_BYTES)
    try:
        with warnings.catch_warnings():
            # PIL warns about e.g. corrupt EXIF on files it still decodes: not our business.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.seek(0)
            image.load()
    except UnidentifiedImageError as err:
        raise BadImage(NOT_AN_IMAGE, "not a recognised image format") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(TOO_LARGE, str(err).split(".")[0]) from err
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as err:
        text = str(err) or err.__class__.__name__
        reason = TRUNCATED if isinstance(err, EOFError) or "truncat" in text.lower() else CORRUPT
        raise BadImage(reason, text) from err
    return image


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    # PIL's I;16/I -> L conversion clips at 255 instead of scaling; scale the 16-bit range.
    array = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(array / 257.0), 0, 255).astype(np.uint8), "L")


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to L (`channels=1`) or RGB (3); transparency goes onto white."""
    mode = image.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        image = _sixteen_bit_to_l(image)
    elif mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in image.info
    ):
        image = _composite_on_white(image)
    elif mode not in ("L", "RGB"):
        # P, 1, CMYK, YCbCr, LAB, HSV, RGBX...: PIL knows the way to RGB.
        image = image.convert("RGB")
    return image.convert("L" if channels == 1 else "RGB")


def center_crop_square(image: Image.Image) -> Image.Image:
    """The largest centered square."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def encode_png(image: Image.Image) -> bytes:
    """Deterministic lossless PNG bytes (no timestamps or text chunks)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **_PNG_OPTIONS)
    return buffer.getvalue()


def prepare_image(
    image: Image.Image, *, image_size: int, channels: int, min_side_px: int
) -> PreparedImage:
    """Orient, convert, crop and resize one decoded image; raise `BadImage` if too small."""
    try:
        image = ImageOps.exif_transpose(image)
        width, height = image.size
        if min(width, height) < min_side_px:
            raise BadImage(TOO_SMALL, f"{width}x{height} px, minimum side {min_side_px} px")
        square = center_crop_square(to_channels(image, channels))
        if square.size != (image_size, image_size):
            # LANCZOS in PIL widens its kernel when shrinking, i.e. it antialiases.
            square = square.resize((image_size, image_size), Image.Resampling.LANCZOS)
        png = encode_png(square)
    except (OSError, ValueError, SyntaxError, TypeError, KeyError) as err:
        # e.g. a malformed EXIF block, or a mode PIL cannot convert
        raise BadImage(CORRUPT, str(err) or err.__class__.__name__) from err
    pixels = np.asarray(square, dtype=np.float64).reshape(image_size * image_size, -1) / 255.0
    return PreparedImage(
        png=png,
        sha256=hashlib.sha256(png).hexdigest(),
        width=width,
        height=height,
        pixel_sum=tuple(pixels.sum(axis=0).tolist()),
        pixel_sq_sum=tuple((pixels**2).sum(axis=0).tolist()),
        pixel_count=pixels.shape[0],
    )


def prepare_bytes(
    data: bytes, *, image_size: int, channels: int, min_side_px: int
) -> PreparedImage:
    """`prepare_image` of encoded image bytes."""
    return prepare_image(
        decode(data), image_size=image_size, channels=channels, min_side_px=min_side_px
    )


def prepare_array(
    pixels: np.ndarray, *, image_size: int, channels: int, min_side_px: int
) -> PreparedImage:
    """`prepare_image` of a uint8 (H, W) or (H, W, 3) array."""
    return prepare_image(
        Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)),
        image_size=image_size,
        channels=channels,
        min_side_px=min_side_px,
    )

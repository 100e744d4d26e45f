"""Geometry structs: Origin, Size, Region (MTLRegion) and Offset (MPSOffset, signed).
Every API that takes one also takes a plain tuple."""
from typing import NamedTuple

from mpskernels.errors import ValidationError

NO_CLIP = 1 << 62  # MPSRectNoClip's size: "the whole destination"
LIMIT = 1 << 40    # coordinates beyond this are mistakes (and would overflow the C strides)


class Origin(NamedTuple):
    x: int = 0
    y: int = 0
    z: int = 0


class Size(NamedTuple):
    width: int = 1
    height: int = 1
    depth: int = 1


class Offset(NamedTuple):
    x: int = 0
    y: int = 0
    z: int = 0


class Region(NamedTuple):
    origin: Origin = Origin()
    size: Size = Size()

    @classmethod
    def make(cls, x, y, width, height, z=0, depth=1):
        return cls(Origin(x, y, z), Size(width, height, depth))


RECT_NO_CLIP = Region(Origin(0, 0, 0), Size(NO_CLIP, NO_CLIP, NO_CLIP))


def _ints(value, n, what):
    try:
        items = tuple(value)
    except TypeError:
        raise ValidationError(f"{what} must be a tuple of up to {n} integers, got {value!r}") from None
    if not 0 < len(items) <= n or not all(isinstance(v, int) or hasattr(v, "__index__") for v in items):
        raise ValidationError(f"{what} must be a tuple of up to {n} integers, got {value!r}")
    items = tuple(v.__index__() for v in items)
    if any(abs(v) > LIMIT for v in items):
        raise ValidationError(f"{what} {value!r} is out of range (|value| <= 2**40)")
    return items


def as_offset(value):
    if isinstance(value, Offset):
        return value
    return Offset(*_ints(value, 3, "offset"))


def as_origin(value):
    if isinstance(value, Origin):
        return value
    o = Origin(*_ints(value, 3, "origin"))
    if min(o) < 0:
        raise ValidationError(f"origin must not be negative, got {tuple(o)}")
    return o


def as_region(value):
    """A Region from a Region, ((x, y[, z]), (w, h[, d])) or (x, y, w, h)."""
    if isinstance(value, Region):
        return value
    value = tuple(value)
    if len(value) == 2:
        size = value[1]
        if isinstance(size, Size):
            size = tuple(min(v, LIMIT) for v in size)   # RECT_NO_CLIP-style huge sizes
        region = Region(as_origin(value[0]), Size(*_ints(size, 3, "region size")))
    elif len(value) == 4:
        x, y, w, h = _ints(value, 4, "region")
        region = Region(as_origin((x, y)), Size(w, h, 1))
    else:
        raise ValidationError(f"a region is ((x, y, z), (width, height, depth)) or (x, y, width, height), got {value!r}")
    if min(region.size) < 0:
        raise ValidationError(f"region size must not be negative, got {tuple(region.size)}")
    return region

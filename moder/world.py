"""The embedded benchmark's rendered world: coloured shapes, drawn deterministically from a seed.

A class is a (colour, shape) pair named "<colour> <shape>". A domain (moder.params.DomainParams) describes how a
dataset draws its images. Its shifts act on attributes, as a real domain shift acts on a
concept wherever it appears: a colour is tinted the same way in every class that has it,
and a shape drawn as an outline is drawn so in every class that has it. Tint directions are
the world's, shared by every tinted domain, unless a domain has its own (`own_tint`).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moder.params import SHAPES, DomainParams, WorldParams

_SUPERSAMPLE = 2  # render at 2x and average-pool: anti-aliased edges
_MAX_TILT = math.radians(20)  # small tilts only: a square turned 45 degrees would be a diamond


@dataclass(frozen=True)
class World:
    colours: dict[str, tuple[float, float, float]]  # name -> RGB in [0, 1]
    shapes: tuple[str, ...]
    image_size: int
    seed: int

    def __post_init__(self) -> None:
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown shapes {unknown}; the renderer draws {', '.join(SHAPES)}")

    @classmethod
    def of(cls, params: WorldParams, seed: int) -> World:
        """The world params.yaml's `world` section describes, drawn from `seed`."""
        return cls(dict(params.colours), tuple(params.shapes), params.image_size, seed)

    @property
    def class_names(self) -> list[str]:
        return [f"{colour} {shape}" for colour in self.colours for shape in self.shapes]

    def attributes(self, classes: Tensor) -> tuple[Tensor, Tensor]:
        """(colour index, shape index) of each class index."""
        return classes // len(self.shapes), classes % len(self.shapes)

    def tint_directions(self, domain_name: str | None = None) -> Tensor:
        """One unit RGB direction per colour: where this world's tinted domains push each colour
        (with `domain_name`: where that domain alone pushes them, for a shift no other dataset shares)."""
        names = ("tint",) if domain_name is None else ("tint", domain_name)
        generator = torch.Generator().manual_seed(seed_for(self.seed, *names))
        return F.normalize(torch.randn(len(self.colours), 3, generator=generator), dim=-1)


def seed_for(seed: int, *names: str) -> int:
    """A stable seed for a named stream (crc32, not Python's salted hash)."""
    return (seed * 1_000_003 + zlib.crc32("/".join(names).encode())) % (2**63)


def outlined_shapes(world: World, domain: DomainParams, domain_name: str) -> list[str]:
    """The shapes `domain` draws as outlines: a fixed draw per (world seed, domain name)."""
    count = round(domain.outline * len(world.shapes))
    generator = torch.Generator().manual_seed(seed_for(world.seed, "outline", domain_name))
    order = torch.randperm(len(world.shapes), generator=generator)[:count]
    return [world.shapes[i] for i in sorted(order.tolist())]


def _polar(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return torch.sqrt(x * x + y * y), torch.atan2(y, x)


def _polygon(x: Tensor, y: Tensor, sides: int, radius: float) -> Tensor:
    """<= 1 inside a regular polygon of circumradius `radius` with a vertex pointing up."""
    r, theta = _polar(x, y)
    sector = 2 * math.pi / sides
    phi = torch.remainder(theta - math.pi / 2 + sector / 2, sector) - sector / 2
    return r * torch.cos(phi) / (radius * math.cos(math.pi / sides))


def _star(x: Tensor, y: Tensor, points: int = 5, outer: float = 1.0, inner: float = 0.45) -> Tensor:
    """<= 1 inside a `points`-pointed star: radius over the boundary radius in that direction."""
    r, theta = _polar(x, y)
    sector = 2 * math.pi / points
    phi = torch.remainder(theta - math.pi / 2, sector)
    phi = torch.minimum(phi, sector - phi)  # fold onto [0, sector/2]: outer vertex at 0, inner at sector/2
    ax, ay = outer, 0.0
    bx, by = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
    nx, ny = by - ay, ax - bx  # normal of the edge from the outer to the inner vertex
    boundary = (nx * ax + ny * ay) / (nx * torch.cos(phi) + ny * torch.sin(phi))
    return r / boundary


def shape_level(shape: str, x: Tensor, y: Tensor) -> Tensor:
    """A level function of local coordinates: <= 1 inside the shape, growing outward."""
    if shape == "circle":
        return torch.sqrt(x * x + y * y) / 0.9
    if shape == "square":
        return torch.maximum(x.abs(), y.abs()) / 0.72
    if shape == "triangle":
        return _polygon(x, y + 0.15, 3, 1.05)
    if shape == "star":
        return _star(x, y)
    if shape == "diamond":
        return (x.abs() / 0.75 + y.abs()) / 1.0
    if shape == "cross":
        arm = lambda u, v: torch.maximum(u.abs() / 0.3, v.abs() / 0.92)  # noqa: E731
        return torch.minimum(arm(x, y), arm(y, x))
    if shape == "hexagon":
        return _polygon(x, y, 6, 0.9)
    if shape == "ring":
        r = torch.sqrt(x * x + y * y)
        return torch.maximum(r / 0.9, 0.5 / r.clamp_min(1e-6))
    raise ValueError(f"unknown shape {shape!r}")


def _gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    radius = max(1, math.ceil(2.5 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    images = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    images = F.conv2d(images, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(images, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def render(
    world: World,
    domain: DomainParams,
    domain_name: str,
    labels: Tensor,
    generator: torch.Generator,
    chunk: int = 512,
) -> Tensor:
    """Images [N, 3, S, S] in [0, 1] of the classes in `labels` (class indices of `world`).

    Per image: random position, size, tilt, background and a little colour jitter, all
    drawn from `generator`; per domain: the attribute-level shifts of `domain`.
    """
    colour_of, shape_of = world.attributes(labels)
    base = torch.tensor(list(world.colours.values()), dtype=torch.float32)
    directions = world.tint_directions(domain_name if domain.own_tint else None)
    tinted = (base + domain.tint * directions).clamp(0, 1)
    outlined = set(outlined_shapes(world, domain, domain_name))
    size = world.image_size * _SUPERSAMPLE
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    grid_y, grid_x = torch.meshgrid(axis, axis, indexing="ij")
    parts = []
    for start in range(0, len(labels), chunk):
        colours, shapes = colour_of[start : start + chunk], shape_of[start : start + chunk]
        n = len(colours)
        centre = (torch.rand(n, 2, generator=generator) - 0.5) * 0.6
        radius = domain.scale[0] + (domain.scale[1] - domain.scale[0]) * torch.rand(n, generator=generator)
        angle = (torch.rand(n, generator=generator) - 0.5) * _MAX_TILT * 2
        low, high = domain.background
        grey = low + (high - low) * torch.rand(n, generator=generator)
        jitter = 0.04 * torch.randn(n, 3, generator=generator)
        stripe_angle = torch.rand(n, generator=generator) * math.pi
        stripe_freq = 3 + 5 * torch.rand(n, generator=generator)
        stripe_phase = torch.rand(n, generator=generator) * 2 * math.pi

        dx = grid_x[None] - centre[:, 0, None, None]
        dy = grid_y[None] - centre[:, 1, None, None]
        cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
        x = (cos * dx + sin * dy) / radius[:, None, None]
        y = (-sin * dx + cos * dy) / radius[:, None, None]
        level = torch.empty_like(x)
        inside = torch.empty_like(x, dtype=torch.bool)
        for index, shape in enumerate(world.shapes):
            rows = shapes == index
            if rows.any():
                level[rows] = shape_level(shape, x[rows], -y[rows])  # image rows grow downward
                inside[rows] = level[rows] <= 1
                if shape in outlined:
                    inside[rows] &= level[rows] > 0.62
        mask = inside.float()[:, None]

        along = torch.cos(stripe_angle)[:, None, None] * grid_x + torch.sin(stripe_angle)[:, None, None] * grid_y
        stripes = domain.texture * torch.sin(stripe_freq[:, None, None] * math.pi * along + stripe_phase[:, None, None])
        background = (grey[:, None, None] + stripes)[:, None].expand(-1, 3, -1, -1)
        colour = (tinted[colours] + jitter).clamp(0, 1)[:, :, None, None]
        images = F.avg_pool2d(background * (1 - mask) + colour * mask, _SUPERSAMPLE)
        if domain.blur > 0:
            images = _gaussian_blur(images, domain.blur)
        images = 0.5 + domain.contrast * (images - 0.5)
        if domain.noise > 0:
            images = images + domain.noise * torch.randn(images.shape, generator=generator)
        parts.append(images.clamp(0, 1))
    return torch.cat(parts) if parts else torch.empty(0, 3, world.image_size, world.image_size)


def class_splits(n_classes: int, splits: int, seed: int, dataset_name: str, shuffle: bool = True) -> list[Tensor]:
    """A dataset's classes (shuffled from the seed, or in label order) cut into `splits` disjoint, near-equal parts."""
    if not 1 <= splits <= n_classes:
        raise ValueError(f"cannot split {n_classes} classes into {splits} tasks")
    generator = torch.Generator().manual_seed(seed_for(seed, "splits", dataset_name))
    order = torch.randperm(n_classes, generator=generator) if shuffle else torch.arange(n_classes)
    return [part.sort().values for part in torch.tensor_split(order, splits)]


def dataset_classes(world: World, count: int | None, dataset_name: str, offset: int | None = None) -> Tensor:
    """The class subset a dataset draws from the world: all classes when `count` is None; else `count` of
    them drawn for this dataset alone, or with `offset` the positions offset..offset+count-1 of one order
    of the world's classes that every dataset shares (so datasets whose ranges do not overlap share no class)."""
    total = len(world.class_names)
    if count is None or (count == total and offset is None):
        return torch.arange(total)
    start = 0 if offset is None else offset
    if not (1 <= count and 0 <= start and start + count <= total):
        raise ValueError(f"cannot take {count} classes from position {start} of a world of {total}")
    names = ("classes",) if offset is not None else ("classes", dataset_name)
    generator = torch.Generator().manual_seed(seed_for(world.seed, *names))
    return torch.randperm(total, generator=generator)[start : start + count].sort().values

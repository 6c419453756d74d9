"""A small gallery of real photos that ship inside installed packages, plus queries.

Why: demos, integration tests and retrieval evaluation need real images, but the
services run offline and the repo should not carry binary fixtures. scikit-image
and scikit-learn bundle a handful of classic photos; this module exposes them as
PIL images with a short description, together with text queries whose correct
answer is known.

Only the images bundled in the wheels are used (no ``pooch`` downloads).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class SamplePhoto:
    """One bundled photo: unique ``name``, human ``description``, where it comes from."""

    name: str
    description: str
    source: str
    image: Image.Image


@dataclass(frozen=True)
class SampleQuery:
    """A text query and the name of the photo that should be retrieved first.

    ``imagenet_concept`` is True when the query's subject is (close to) one of the
    1000 ImageNet classes, i.e. a classifier-based embedder such as ConSE can
    plausibly answer it; the others (astronaut, moon, grass...) are out of its
    vocabulary and measure how it degrades.
    """

    text: str
    expected: str
    imagenet_concept: bool


def _load_array(source: str) -> np.ndarray:
    """Load the bundled image named by ``source`` ("skimage:<fn>" / "sklearn:<file>")."""
    kind, _, name = source.partition(":")
    if kind == "skimage":
        import skimage.data

        if name == "stereo_motorcycle":
            return skimage.data.stereo_motorcycle()[0]  # left view of the stereo pair
        return getattr(skimage.data, name)()
    if kind == "sklearn":
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)
    raise ValueError(f"unknown sample photo source {source!r}")


# name -> (description, source). Real photographs only (no synthetic test patterns),
# chosen to cover objects ImageNet knows (cat, espresso, ...) and some it does not
# (astronaut, moon, microscopy) so evaluations show both behaviours.
_CATALOGUE: dict[str, tuple[str, str]] = {
    "astronaut": ("Astronaut Eileen Collins in flight suit, US flag behind", "skimage:astronaut"),
    "cat": ("Chelsea the tabby cat, close-up", "skimage:chelsea"),
    "coffee": ("A cup of espresso on a saucer with a spoon", "skimage:coffee"),
    "rocket": ("A rocket on the launch pad", "skimage:rocket"),
    "cameraman": ("B/W photo of a man with a camera on a tripod", "skimage:camera"),
    "motorcycle": ("A motorcycle parked in a garage", "skimage:stereo_motorcycle"),
    "china": ("A Chinese temple / pagoda among trees", "sklearn:china.jpg"),
    "flower": ("A pink flower close-up", "sklearn:flower.jpg"),
    "hubble_deep_field": ("Hubble deep field: galaxies in deep space", "skimage:hubble_deep_field"),
    "immunohistochemistry": ("Microscopy of stained tissue", "skimage:immunohistochemistry"),
    "retina": ("Fundus photograph of a human retina", "skimage:retina"),
    "coins": ("Greek coins on a table, B/W", "skimage:coins"),
    "clock": ("A wall clock, motion blurred, B/W", "skimage:clock"),
    "moon": ("Surface of the moon with craters, B/W", "skimage:moon"),
    "brick": ("A brick wall, B/W", "skimage:brick"),
    "grass": ("Grass, B/W texture", "skimage:grass"),
    "gravel": ("Gravel, B/W texture", "skimage:gravel"),
}

#: Text queries with their expected photo (by ``SamplePhoto.name``).
SAMPLE_QUERIES: tuple[SampleQuery, ...] = (
    SampleQuery("a cat", "cat", True),
    SampleQuery("a tabby cat", "cat", True),
    SampleQuery("a cup of coffee", "coffee", True),
    SampleQuery("espresso", "coffee", True),
    SampleQuery("a rocket", "rocket", True),
    SampleQuery("a missile on a launch pad", "rocket", True),
    SampleQuery("a motorcycle", "motorcycle", True),
    SampleQuery("a motorbike in a garage", "motorcycle", True),
    SampleQuery("a flower", "flower", True),
    SampleQuery("a chinese temple", "china", True),
    SampleQuery("a pagoda", "china", True),
    SampleQuery("a photographer with a camera on a tripod", "cameraman", True),
    SampleQuery("a clock", "clock", True),
    SampleQuery("a brick wall", "brick", False),
    SampleQuery("an astronaut", "astronaut", False),
    SampleQuery("old coins", "coins", False),
    SampleQuery("the surface of the moon", "moon", False),
    SampleQuery("green grass", "grass", False),
    SampleQuery("galaxies in deep space", "hubble_deep_field", False),
    SampleQuery("stained cells under a microscope", "immunohistochemistry", False),
    SampleQuery("the retina of an eye", "retina", False),
)


def sample_photo_names() -> list[str]:
    """Names of the bundled photos, in gallery order (no image loading)."""
    return list(_CATALOGUE)


def load_sample_photos(names: list[str] | None = None) -> list[SamplePhoto]:
    """Load the bundled photos (all, or only ``names``) as PIL images.

    Colour photos are RGB, grayscale ones mode "L". Requires scikit-image and
    scikit-learn to be installed; nothing is downloaded.
    """
    wanted = set(names) if names is not None else None
    if wanted is not None and not wanted <= _CATALOGUE.keys():
        raise KeyError(f"unknown sample photo(s): {sorted(wanted - _CATALOGUE.keys())}")
    photos = []
    for name, (description, source) in _CATALOGUE.items():
        if wanted is not None and name not in wanted:
            continue
        array = np.ascontiguousarray(_load_array(source))
        if array.dtype != np.uint8:
            raise TypeError(f"{source} returned {array.dtype}, expected uint8")
        photos.append(SamplePhoto(name, description, source, Image.fromarray(array)))
    return photos

"""The AVSBench-semantic classes and their colour palette.

AVSBench colour-codes ``labels_rgb`` with the PASCAL-VOC bit-interleaved colormap over its
71 classes: palette index 0 = background = (0, 0, 0), 1 = accordion = (128, 0, 0), ...
``label2idx.json`` maps each class to ``palette index + 1`` (background = 1).
``labels_semantic`` PNGs hold the palette index itself, one channel.
"""

from __future__ import annotations

import numpy as np

#: Palette index -> class name: background first, then the 70 AVSBench classes alphabetically.
AVSBENCH_CLASSES = (
    "background",
    "accordion",
    "airplane",
    "axe",
    "baby",
    "bassoon",
    "bell",
    "bird",
    "boat",
    "boy",
    "bus",
    "car",
    "cat",
    "cello",
    "clarinet",
    "clipper",
    "clock",
    "dog",
    "donkey",
    "drum",
    "duck",
    "elephant",
    "emergency-car",
    "erhu",
    "flute",
    "frying-food",
    "girl",
    "goose",
    "guitar",
    "gun",
    "guzheng",
    "hair-dryer",
    "handpan",
    "harmonica",
    "harp",
    "helicopter",
    "hen",
    "horse",
    "keyboard",
    "leopard",
    "lion",
    "man",
    "marimba",
    "missile-rocket",
    "motorcycle",
    "mower",
    "parrot",
    "piano",
    "pig",
    "pipa",
    "saw",
    "saxophone",
    "sheep",
    "sitar",
    "sorna",
    "squirrel",
    "tabla",
    "tank",
    "tiger",
    "tractor",
    "train",
    "trombone",
    "truck",
    "trumpet",
    "tuba",
    "ukulele",
    "utv",
    "vacuum-cleaner",
    "violin",
    "wolf",
    "woman",
)
NUM_CLASSES = len(AVSBENCH_CLASSES)  # 71


def label2idx() -> dict[str, int]:
    """The content of AVSBench's ``label2idx.json``: class name -> palette index + 1."""
    return {name: index + 1 for index, name in enumerate(AVSBENCH_CLASSES)}


def class_index(name: str) -> int:
    """Palette index (the value in a ``labels_semantic`` PNG) of a class name."""
    return AVSBENCH_CLASSES.index(name)


def palette(num_classes: int = NUM_CLASSES) -> np.ndarray:
    """``[num_classes, 3]`` uint8 RGB colours: bit k of the index goes to bit 7-k/3 of R, G or B."""
    colours = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(num_classes):
        rest, bit = index, 7
        while rest:
            for channel in range(3):
                colours[index, channel] |= ((rest >> channel) & 1) << bit
            rest >>= 3
            bit -= 1
    return colours


def colour_to_index(rgb: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Palette indices of an ``[H, W, 3]`` colour mask; unknown colours become background (0),
    as in the original AVSBench loaders."""
    colours = palette(num_classes).astype(np.int32)
    packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    keys = (colours[:, 0] << 16) | (colours[:, 1] << 8) | colours[:, 2]
    lookup = dict(zip(keys.tolist(), range(num_classes)))
    uniques, inverse = np.unique(packed, return_inverse=True)
    return np.array([lookup.get(u, 0) for u in uniques.tolist()], dtype=np.uint8)[inverse].reshape(packed.shape)


def index_to_colour(indices: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` uint8 colour mask of an ``[H, W]`` array of palette indices."""
    return _PALETTE[indices]


_PALETTE = palette()  # read-only use in index_to_colour; palette() hands out fresh copies

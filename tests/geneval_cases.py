"""Synthetic GenEval detections covering every task type, for the decision tests.

Each case is a prompt's metadata and what a detector found: objects with a class, a score, a box and
(if painted) a colour; the image is those objects painted as ellipses on a background, each mask the
ellipse, each box the mask's tight box (x2 = last column + 1, as mmdet's mask2bbox). `scenery` is
painted but not detected (it tests that a colour is read inside the mask only).

`python tests/geneval_official.py <geneval checkout>` runs GenEval's own `evaluate_image` on these
cases and writes tests/data/geneval_official.json, which tests/test_geneval.py compares with ours.
The colour classifier of both is `nearest_colour` (the mean of a crop's non-grey pixels, nearest of
ten RGB prototypes) in place of CLIP, so the comparison covers the crops and every decision.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

W, H = 160, 120
BLACK, WHITE = (0, 0, 0), (255, 255, 255)
PROTOTYPES = {
    "red": (230, 20, 20), "orange": (255, 150, 0), "yellow": (250, 240, 30), "green": (20, 160, 40), "blue": (20, 40, 230),
    "purple": (130, 30, 150), "pink": (255, 170, 200), "brown": (120, 70, 20), "black": (0, 0, 0), "white": (255, 255, 255),
}


def obj(cls: str, score: float, box: tuple, colour: str | None = "red", ring: bool = False) -> dict:
    return {"class": cls, "score": score, "box": list(box), "colour": colour, "ring": ring}


def meta(tag: str, include: list, exclude: list | None = None, prompt: str = "a synthetic prompt") -> dict:
    return {"tag": tag, "include": include, **({"exclude": exclude} if exclude else {}), "prompt": prompt}


SINGLE = [{"class": "dog", "count": 1}]
TWO = [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]
COUNT3 = meta("counting", [{"class": "apple", "count": 3}], [{"class": "apple", "count": 4}])
RED_CAR = meta("colors", [{"class": "car", "count": 1, "color": "red"}])
DOG_LEFT_OF_CAT = meta("position", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}])
DOG_BELOW_CAT = meta("position", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["below", 0]}])
RED_DOG_BLUE_CAT = meta("color_attr", [{"class": "dog", "count": 1, "color": "red"}, {"class": "cat", "count": 1, "color": "blue"}])
APPLES = [(5, 10, 35, 40), (45, 10, 75, 40), (85, 10, 115, 40), (5, 60, 35, 90), (45, 60, 75, 90)]

CASES = [
    ("single: found", meta("single_object", SINGLE), [obj("dog", 0.95, (20, 20, 80, 90))]),
    ("single: below threshold", meta("single_object", SINGLE), [obj("dog", 0.29, (20, 20, 80, 90))]),
    ("single: at the threshold is not above it", meta("single_object", SINGLE), [obj("dog", 0.3, (20, 20, 80, 90))]),
    ("single: another class", meta("single_object", SINGLE), [obj("cat", 0.9, (20, 20, 80, 90))]),
    ("single: at most 16 kept, most confident first", meta("single_object", SINGLE),
     [obj("dog", 0.31 + 0.03 * ((7 * i) % 20), (5 + 7 * i, 5 + 4 * (i % 5), 20 + 7 * i, 30 + 4 * (i % 5))) for i in range(20)]),
    ("two: both", meta("two_object", TWO), [obj("dog", 0.8, (5, 20, 60, 90)), obj("cat", 0.7, (90, 20, 150, 100), "blue")]),
    ("two: one weak", meta("two_object", TWO), [obj("dog", 0.8, (5, 20, 60, 90)), obj("cat", 0.2, (90, 20, 150, 100), "blue")]),
    ("two: neither", meta("two_object", TWO), [obj("bird", 0.8, (5, 20, 60, 90))]),
    ("counting: exact", COUNT3, [obj("apple", 0.95, b) for b in APPLES[:3]]),
    ("counting: a fourth under 0.9 is not counted", COUNT3, [obj("apple", 0.95, b) for b in APPLES[:3]] + [obj("apple", 0.85, APPLES[3])]),
    ("counting: one too many", COUNT3, [obj("apple", 0.95, b) for b in APPLES[:4]]),
    ("counting: one under 0.9", COUNT3, [obj("apple", 0.95, b) for b in APPLES[:2]] + [obj("apple", 0.6, APPLES[2])]),
    ("counting: five", COUNT3, [obj("apple", 0.91 + 0.01 * i, b) for i, b in enumerate(APPLES)]),
    ("colors: right colour", RED_CAR, [obj("car", 0.9, (30, 20, 130, 100), "red")]),
    ("colors: wrong colour", RED_CAR, [obj("car", 0.9, (30, 20, 130, 100), "blue")]),
    ("colors: only the most confident car is read", RED_CAR, [obj("car", 0.9, (5, 20, 70, 100), "green"), obj("car", 0.8, (90, 20, 155, 100), "red")]),
    ("colors: read inside the mask only", RED_CAR, [obj("car", 0.9, (10, 10, 150, 110), "red", ring=True)]),
    ("position: left", DOG_LEFT_OF_CAT, [obj("cat", 0.9, (100, 30, 150, 90)), obj("dog", 0.9, (10, 30, 60, 90))]),
    ("position: right", DOG_LEFT_OF_CAT, [obj("cat", 0.9, (10, 30, 60, 90)), obj("dog", 0.9, (100, 30, 150, 90))]),
    ("position: inside the margin", DOG_LEFT_OF_CAT, [obj("cat", 0.9, (40, 30, 100, 90)), obj("dog", 0.9, (33, 35, 93, 95))]),
    ("position: diagonal counts both ways", DOG_LEFT_OF_CAT, [obj("cat", 0.9, (90, 60, 150, 115)), obj("dog", 0.9, (10, 5, 60, 50))]),
    ("position: mostly above, not left", DOG_LEFT_OF_CAT, [obj("cat", 0.9, (60, 70, 110, 115)), obj("dog", 0.9, (45, 5, 95, 50))]),
    ("position: below", DOG_BELOW_CAT, [obj("cat", 0.9, (50, 5, 110, 45)), obj("dog", 0.9, (55, 70, 105, 115))]),
    ("position: no target", DOG_LEFT_OF_CAT, [obj("dog", 0.9, (10, 30, 60, 90))]),
    ("position: every target object", meta("position", [{"class": "cat", "count": 2}, {"class": "dog", "count": 1, "position": ["left of", 0]}]),
     [obj("cat", 0.9, (100, 10, 150, 50)), obj("cat", 0.8, (30, 70, 70, 110)), obj("dog", 0.9, (50, 10, 90, 50))]),
    ("color_attr: both right", RED_DOG_BLUE_CAT, [obj("dog", 0.9, (5, 20, 70, 100), "red"), obj("cat", 0.9, (90, 20, 155, 100), "blue")]),
    ("color_attr: swapped", RED_DOG_BLUE_CAT, [obj("dog", 0.9, (5, 20, 70, 100), "blue"), obj("cat", 0.9, (90, 20, 155, 100), "red")]),
    ("color_attr: one missing", RED_DOG_BLUE_CAT, [obj("dog", 0.9, (5, 20, 70, 100), "red")]),
    ("color_attr: white on black, brown", RED_DOG_BLUE_CAT, [obj("dog", 0.9, (5, 20, 70, 100), "brown"), obj("cat", 0.9, (90, 20, 155, 100), "white")]),
]
SCENERY = {"colors: read inside the mask only": [((10, 10, 150, 110), "blue")]}  # a blue board behind a red ring


def ellipse(box: tuple) -> np.ndarray:
    """(H, W) bool: the ellipse inscribed in the box's pixels [x1, x2) x [y1, y2)."""
    x1, y1, x2, y2 = box
    yy, xx = np.mgrid[0:H, 0:W]
    cx, cy, rx, ry = (x1 + x2 - 1) / 2, (y1 + y2 - 1) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def ring(box: tuple) -> np.ndarray:
    """The ellipse less one a third smaller inside it: a mask that covers under half its box."""
    x1, y1, x2, y2 = box
    dx, dy = (x2 - x1) // 6, (y2 - y1) // 6
    return ellipse(box) & ~ellipse((x1 + dx, y1 + dy, x2 - dx, y2 - dy))


def tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def render(name: str, objects: list[dict], classnames: list[str]) -> tuple[np.ndarray, list[np.ndarray], list[list[np.ndarray]]]:
    """(image (H, W, 3) uint8, per-class boxes (n, 5) float32, per-class masks) as mmdet returns them."""
    image = np.zeros((H, W, 3), np.uint8)
    for box, colour in SCENERY.get(name, []):
        image[box[1] : box[3], box[0] : box[2]] = PROTOTYPES[colour]
    boxes = [np.zeros((0, 5), np.float32) for _ in classnames]
    masks = [[] for _ in classnames]
    for o in objects:
        mask = ring(o["box"]) if o["ring"] else ellipse(o["box"])
        if o["colour"]:
            image[mask] = PROTOTYPES[o["colour"]]
        i = classnames.index(o["class"])
        boxes[i] = np.concatenate([boxes[i], np.array([tight_box(mask) + [o["score"]]], np.float32)])
        masks[i].append(mask)
    return image, boxes, masks


def nearest_colour(crop: Image.Image) -> str:
    """The stand-in colour classifier: the prototype nearest the mean of the crop's non-grey pixels."""
    pixels = np.asarray(crop.convert("RGB"), np.float64).reshape(-1, 3)
    pixels = pixels[~(pixels == 153).all(1)]
    mean = pixels.mean(0) if len(pixels) else np.full(3, 153.0)
    names = list(PROTOTYPES)
    return names[int(np.argmin([((mean - np.array(PROTOTYPES[n])) ** 2).sum() for n in names]))]

"""GenEval's decisions (Ghosh et al. 2023): object presence, counting, colour, position, attribute binding.

Follows `evaluation/evaluate_images.py` of github.com/djghosh13/geneval (@af4902f, MIT) decision by
decision, on the detector's per-class boxes [x1, y1, x2, y2, score] (float32, as mmdet gives them)
and masks:

    keep       per class: sorted by score, score > 0.3 (> 0.9 on counting prompts), the first 16 (no NMS)
    include    every clause must hold (AND): at least `count` objects of `class` kept; of the `count`
               most confident, at least `count` classified as `color`; each of those `position`
               ("left of", "right of", "above", "below") of every object that include clause `group`
               matched, after a margin of 0.1 x the two objects' summed sizes is taken off the offset
    exclude    fails when `count` or more objects of `class` are kept (counting: no extra object)
    colour     a zero-shot CLIP classifier over ten colours, on the object's box cropped from the
               image with everything outside its mask painted grey (#999)

An image scores 1 when correct; a task's score is the mean over its images, the overall score the
unweighted mean of the six tasks' (`summary_scores.py`). The detector is `evaluation.detector`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
CROP_BACKGROUND = (153, 153, 153)  # "#999"
# GenEval's object_names.txt: COCO's 80 thing classes in COCO's order, some renamed (mouse, remote, keyboard)
CLASSNAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

Detection = tuple  # (box float32 [x1, y1, x2, y2, score], mask bool (H, W) or None), as GenEval keeps them
ColourFn = Callable[[list, str], list]  # (the objects to classify, their class) -> a colour name each


def keep_confident(boxes: list[np.ndarray], masks: list, tag: str) -> dict[str, list[Detection]]:
    """{class name: its kept detections, most confident first} from per-class (n, 5) boxes and n masks."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    kept = {}
    for index, name in enumerate(CLASSNAMES):
        order = np.argsort(boxes[index][:, 4])[::-1]
        order = order[boxes[index][order, 4] > threshold][:MAX_OBJECTS]
        if len(order):
            kept[name] = [(boxes[index][i], None if masks is None else masks[index][i]) for i in order]
    return kept


def relative_position(obj_a: Detection, obj_b: Detection) -> set[str]:
    """Where A lies relative to B: the centres' offset, shortened on each axis by 0.1 x the two
    objects' summed sizes; a direction holds when it is over half the (unshortened) offset's length."""
    boxes = np.array([obj_a[0], obj_b[0]])[:, :4].reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _check_colour(found: list[Detection], req: dict, colours_of: ColourFn) -> str:
    """Why the `count` most confident objects are not all `color`, else ''."""
    colours = colours_of(found, req["class"])
    if colours.count(req["color"]) >= req["count"]:
        return ""
    others = ", ".join(f"{colours.count(c)} {c}" for c in COLORS if c in colours)
    return f"expected {req['color']} {req['class']}>={req['count']}, found {colours.count(req['color'])} {req['color']}; and {others}"


def _check_position(found: list[Detection], req: dict, targets: list[Detection] | None) -> str:
    """Why an object is not `rel` of every target object, else ''."""
    expected, _ = req["position"]
    if targets is None:
        return f"no target for {req['class']} to be {expected}"
    for obj in found:
        for target in targets:
            relations = relative_position(obj, target)
            if expected not in relations:
                return f"expected {req['class']} {expected} target, found {' and '.join(relations)} target"
    return ""


def evaluate(objects: dict[str, list[Detection]], metadata: dict, colours_of: ColourFn) -> tuple[bool, str]:
    """(correct, reasons joined by newlines) of one image's kept detections against a prompt's metadata."""
    reasons, matched_groups = [], []
    for req in metadata.get("include", []):
        found = objects.get(req["class"], [])[: req["count"]]
        if len(found) < req["count"]:
            reason = f"expected {req['class']}>={req['count']}, found {len(found)}"
        else:
            reason = _check_colour(found, req, colours_of) if "color" in req else ""
            if not reason and "position" in req:
                reason = _check_position(found, req, matched_groups[req["position"][1]])
        reasons += [reason] if reason else []
        matched_groups.append(None if reason else found)
    for req in metadata.get("exclude", []):
        if len(objects.get(req["class"], [])) >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {len(objects[req['class']])}")
    return not reasons, "\n".join(reasons)


def partial_score(objects: dict[str, list[Detection]], metadata: dict, colours_of: ColourFn) -> float:
    """The GenEval training reward of Flow-GRPO and DiffusionNFT (yifan123/reward-server's
    `evaluate_reward`, their `reward_fn={"geneval": 1.0}`): the mean of per-clause terms, partial credit.

    Per include clause, with n = every kept object of its class (not only the `count` best):
        1 - |count - n| / count                     (negative past twice the count)
        n != count and the clause has a colour or position: 0
        n == count, colour: 1 - |count - (objects of that colour)| / count
        n == count, colour right (or none), position: 0 without a target; else 1, and a 0 before it
                    at the first object not in the relation to a target object
    Exclude clauses do not count; an exact count is needed where GenEval's score takes "at least"."""
    terms, matched_groups = [], []
    for req in metadata.get("include", []):
        count, found = req["count"], objects.get(req["class"], [])
        terms.append(1 - abs(count - len(found)) / count)
        matched = len(found) == count
        if not matched:
            terms += [0.0] if "color" in req or "position" in req else []
        else:
            if "color" in req:
                right = colours_of(found, req["class"]).count(req["color"])
                terms.append(1 - abs(count - right) / count)
                matched = right == count
            if "position" in req and matched:
                targets = matched_groups[req["position"][1]]
                if targets is None:
                    matched = False
                    terms.append(0.0)
                else:
                    if _check_position(found, req, targets):
                        matched = False
                        terms.append(0.0)
                    terms.append(1.0)
        matched_groups.append(found if matched else None)
    return sum(terms) / len(terms) if terms else 0.0


def colour_crops(image: np.ndarray, objects: list[Detection]) -> list[Image.Image]:
    """Each object's box cut from the image, everything outside its mask grey (GenEval's ImageCrops)."""
    pil = Image.fromarray(image).convert("RGB")
    blank = Image.new("RGB", pil.size, color=CROP_BACKGROUND)
    crops = []
    for box, mask in objects:
        masked = pil if mask is None else Image.composite(pil, blank, Image.fromarray(mask))
        crops.append(masked.crop(tuple(box[:4])))
    return crops


def task_scores(correct_by_task: dict[str, list[float]]) -> dict[str, float]:
    """{task: mean over its images} for the tasks present, and "overall": their unweighted mean."""
    means = {task: float(np.mean(v)) for task, v in correct_by_task.items() if v}
    return means | ({"overall": float(np.mean(list(means.values())))} if means else {})

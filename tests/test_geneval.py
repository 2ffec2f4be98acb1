"""GenEval: our decisions against the official code's on synthetic detections, the detector's mmdet
post-processing, and the scorer on a tiny Mask2Former and a CLIP colour classifier."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import geneval_cases as cases
from stitchvm_rl.evaluation import detector, geneval, mmdet_convert
from stitchvm_rl.evaluation.geneval_scorer import GenEvalScorer

OFFICIAL = json.loads((Path(__file__).parent / "data" / "geneval_official.json").read_text())


def test_every_decision_matches_the_official_code_on_synthetic_detections():
    """tests/data/geneval_official.json is GenEval's own evaluate_image on tests/geneval_cases.py
    (tests/geneval_official.py): thresholds, the 16-object cap, counting's exclusion, colour on the
    masked crop, the position margin and a missing target, each with its reason text and kept boxes;
    and the reward server's partial-credit training score of the same detections."""
    assert list(geneval.CLASSNAMES) == OFFICIAL["classnames"] and len(OFFICIAL["cases"]) == len(cases.CASES)
    for name, metadata, objects in cases.CASES:
        image, boxes, masks = cases.render(name, objects, list(geneval.CLASSNAMES))
        kept = geneval.keep_confident(boxes, masks, metadata["tag"])
        colours = lambda found, cls, image=image: [cases.nearest_colour(c) for c in geneval.colour_crops(image, found)]  # noqa: E731
        correct, reason = geneval.evaluate(kept, metadata, colours)
        details = {k: [box.tolist() for box, _ in v] for k, v in kept.items()}
        official = OFFICIAL["cases"][name]
        assert {"correct": correct, "reason": reason, "details": details} == {k: official[k] for k in ("correct", "reason", "details")}, name
        # the partial-credit training score of Flow-GRPO and DiffusionNFT (their reward server's)
        assert geneval.partial_score(kept, metadata, colours) == pytest.approx(official["score"], abs=1e-12), name
    assert sum(c["correct"] for c in OFFICIAL["cases"].values()) == 11  # both outcomes of every task are covered
    assert sorted({round(c["score"], 4) for c in OFFICIAL["cases"].values()}) == [-14.0, 0.0, 0.3333, 0.5, 0.6667, 0.75, 1.0]


def test_task_scores_average_the_six_tasks_unweighted():
    scores = geneval.task_scores({"single_object": [1, 1, 1, 1], "counting": [0, 1]})
    assert scores == {"single_object": 1.0, "counting": 0.5, "overall": 0.75}


# ---------------------------------------------------------------- the detector, run as mmdet runs it
def test_mmdet_test_pipeline_sizes_and_padding():
    assert detector.rescaled_size(512, 512, detector.TEST_SCALE) == (800, 800)
    assert detector.rescaled_size(480, 640, detector.TEST_SCALE) == (800, 1067)
    pixels, resized = detector.preprocess(np.zeros((1, 480, 640, 3), np.uint8), detector.TEST_SCALE)
    assert resized == (800, 1067) and pixels.shape == (1, 3, 800, 1088)
    pad = (128 - torch.tensor(detector.PIXEL_MEAN)) / torch.tensor(detector.PIXEL_STD)  # grey 128 padded before normalising
    assert torch.allclose(pixels[0, :, 0, -1], pad) and torch.allclose(pixels[0, :, 0, 0], -torch.tensor(detector.PIXEL_MEAN) / torch.tensor(detector.PIXEL_STD))


def test_instance_postprocess_gives_mmdet_boxes_scores_and_masks():
    """Two confident queries whose mask logits are +5 on a block of the stride-4 map: each box is
    the block x 4 (bilinear upsampling crosses zero halfway between cells), its score the class
    probability times the mean sigmoid inside the mask; every (query, class) pair competes for the 100."""
    classes = torch.full((3, 81), -5.0)
    classes[:, 80] = 5.0  # query 2: no object
    classes[0, geneval.CLASSNAMES.index("dog")], classes[1, geneval.CLASSNAMES.index("cat")] = 8.0, 6.0
    masks = torch.full((3, 8, 10), -5.0)
    masks[0, 1:4, 2:5], masks[1, 5:8, 6:10] = 5.0, 5.0
    boxes, binary = detector.instance_results(classes, masks, (32, 40), (32, 40), (32, 40))
    dog, cat = boxes[geneval.CLASSNAMES.index("dog")], boxes[geneval.CLASSNAMES.index("cat")]
    top_dog, top_cat = dog[dog[:, 4].argmax()], cat[cat[:, 4].argmax()]
    assert top_dog[:4].tolist() == [8, 4, 20, 16] and top_cat[:4].tolist() == [24, 20, 40, 32]
    p_dog = torch.softmax(classes[0], 0)[geneval.CLASSNAMES.index("dog")]
    assert 0.9 * p_dog < top_dog[4] < p_dog and top_dog.dtype == np.float32
    dog_mask = binary[geneval.CLASSNAMES.index("dog")][int(dog[:, 4].argmax())]
    assert dog_mask.shape == (32, 40) and dog_mask[5:15, 9:19].all() and not dog_mask[:, :8].any() and not dog_mask[16:].any()
    assert sum(len(b) for b in boxes) == 100


MMDET = Path(__file__).parent / "data" / "mask2former_mmdet"


@pytest.fixture(scope="module")
def mmdet_converted(tmp_path_factory):
    """tests/data/mask2former_mmdet: a tiny random mmdet 2.28.2 Mask2Former (GenEval's architecture, sizes
    shrunk) and mmdet's own inference_detector outputs on three images at test scale (96, 64)
    (tests/mask2former_official.py), converted by our converter."""
    out = tmp_path_factory.mktemp("mmdet") / "converted"
    mmdet_convert.convert_mmdet_mask2former(str(MMDET / "mask2former_tiny.pth"), str(out))
    (out / detector.SETTINGS_FILE).write_text(json.dumps({"test_scale": [96, 64]}))
    return detector.Mask2FormerDetector.from_pretrained(str(out))


def test_a_converted_mmdet_checkpoint_reproduces_mmdets_detector(mmdet_converted):
    """The converted weights give mmdet's class and mask logits on mmdet's input; our post-processing
    of mmdet's logits gives its 100 boxes, scores and masks; our pre-processing its sizes and pixels
    within one grey level (torch's bilinear resize against cv2's fixed point)."""
    for ref in map(np.load, sorted(MMDET.glob("reference_*.npz"))):
        with torch.no_grad():
            out = mmdet_converted.model(pixel_values=torch.from_numpy(ref["input_tensor"])[None])
        assert torch.allclose(out.class_queries_logits[0], torch.from_numpy(ref["cls_logits"]), atol=2e-5)
        assert torch.allclose(out.masks_queries_logits[0], torch.from_numpy(ref["mask_logits"]), atol=2e-5)
        boxes, masks = detector.instance_results(torch.from_numpy(ref["cls_logits"]), torch.from_numpy(ref["mask_logits"]),
                                                 tuple(ref["batch_input_shape"]), tuple(ref["img_shape"][:2]), tuple(ref["ori_shape"][:2]))
        ours = sorted((c, *box[:4].tolist(), mask.tobytes(), box[4]) for c in range(80) for box, mask in zip(boxes[c], masks[c]))
        theirs_masks = np.unpackbits(ref["masks_packed"])[: np.prod(ref["masks_shape"])].reshape(ref["masks_shape"]).astype(bool)
        theirs = sorted((int(b[0]), *b[1:5].tolist(), m.tobytes(), b[5]) for b, m in zip(ref["boxes"], theirs_masks))
        assert [o[:-1] for o in ours] == [t[:-1] for t in theirs]  # classes, boxes, masks
        assert np.allclose([o[-1] for o in ours], [t[-1] for t in theirs], rtol=0, atol=1e-6)  # scores
        pixels, resized = detector.preprocess(ref["original_rgb"][None], mmdet_converted.test_scale)
        assert resized == tuple(ref["img_shape"][:2]) and pixels.shape[1:] == ref["input_tensor"].shape
        assert (pixels[0] - torch.from_numpy(ref["input_tensor"])).abs().max() <= 1 / min(detector.PIXEL_STD) + 1e-5


def test_detector_labels_must_be_cocos_80_in_order():
    names = dict(enumerate(geneval.CLASSNAMES))
    detector.check_labels(names | {64: "mouse", 65: "remote", 66: "keyboard"})  # transformers' COCO names
    with pytest.raises(ValueError, match="not COCO's 80 in order"):
        detector.check_labels(names | {0: "bicycle", 1: "person"})


# ---------------------------------------------------------------- the scorer end to end, on a tiny detector
@pytest.fixture(scope="module")
def dog_scorer():
    """The tiny random detector with every query made a dog, and the toy world's CLIP for colours."""
    scorer = GenEvalScorer.load("tiny-mask2former", "toyworld-clip")
    scorer.detector.model.class_predictor.bias.data[geneval.CLASSNAMES.index("dog")] += 30.0
    return scorer


def test_the_scorer_judges_images_by_their_prompts_metadata(dog_scorer):
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    metadata = [cases.meta("single_object", [{"class": "dog", "count": 1}]), cases.meta("single_object", [{"class": "cat", "count": 1}]),
                cases.meta("counting", [{"class": "dog", "count": 2}], [{"class": "dog", "count": 3}])]
    scores, reasons = dog_scorer(images, ["a dog", "a cat", "two dogs"], [json.dumps(m) for m in metadata])
    assert scores.tolist() == [1.0, 0.0, 0.0]
    assert reasons[:2] == ["", "expected cat>=1, found 0"] and reasons[2].startswith("expected dog")
    with pytest.raises(ValueError, match="GenEval metadata"):
        dog_scorer(images[:1], ["a dog"], ["{}"])

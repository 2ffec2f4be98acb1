"""Record GenEval's own decisions, and Flow-GRPO's GenEval training score, on the synthetic cases of
tests/geneval_cases.py.

    git clone https://github.com/djghosh13/geneval /tmp/geneval                  # af4902f was used
    git clone https://github.com/yifan123/reward-server /tmp/reward-server       # 92ac29f was used
    pip install --target /tmp/geneval_pkgs --no-deps clip_benchmark==1.4.0 scikit-learn joblib threadpoolctl narwhals cloudpickle pillow==10.4.0
    PYTHONPATH=/tmp/geneval_pkgs python tests/geneval_official.py /tmp/geneval /tmp/reward-server

Imports the official evaluation/evaluate_images.py unchanged. Its detector call (`inference_detector`)
answers with each case's synthetic boxes and masks; its CLIP (model, transform, tokenizer) is a
stand-in whose zero-shot classifier picks `geneval_cases.nearest_colour` of each crop, so the
official ImageCrops, clip_benchmark's classifier and every decision run as published. mmdet and
open_clip are only imported by it, never called here, so empty modules stand in for them.
The reward server's `reward_server/gen_eval.py` (the partial-credit score Flow-GRPO and DiffusionNFT
train with) is imported the same way: its `load_geneval()` builds its closures with the stand-ins,
and its `compute_geneval` answers each case's image.
Writes tests/data/geneval_official.json: the class names and, per case, `correct`, `reason`,
`details` (GenEval) and `score`, `strict` (the reward server).
"""

import importlib.util
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import geneval_cases as cases  # noqa: E402


def import_official(repo: Path):
    for name in ("mmdet", "mmdet.apis", "open_clip"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["mmdet.apis"].inference_detector = sys.modules["mmdet.apis"].init_detector = None
    spec = importlib.util.spec_from_file_location("evaluate_images", repo / "evaluation" / "evaluate_images.py")
    module = importlib.util.module_from_spec(spec)
    available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True  # it asserts a GPU at import
    try:
        spec.loader.exec_module(module)
    finally:
        torch.cuda.is_available = available
    return module


class NearestColourCLIP(torch.nn.Module):
    """encode_image / encode_text of one-hot colour vectors: zero-shot picks the nearest colour."""

    def encode_image(self, images):
        return images

    def encode_text(self, tokens):
        return tokens


def one_hot(name: str) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(list(cases.PROTOTYPES).index(name)), len(cases.PROTOTYPES)).float()


def tokenize(texts):  # "a photo of a {colour}[-colored] {class}" -> the colour's one-hot
    return torch.stack([one_hot(t.removeprefix("a photo of a ").split()[0].split("-")[0]) for t in texts])


def reward_server_scores(repo: Path, classnames: list[str]) -> dict[str, dict]:
    """{case: {score, strict}} of the reward server's compute_geneval, its models the stand-ins."""
    import os

    sys.modules["mmdet"].__file__ = str(repo)
    sys.modules["mmdet.apis"].init_detector = lambda *args, **kwargs: None
    sys.modules["open_clip"].create_model_and_transforms = lambda *args, **kwargs: (NearestColourCLIP(), None, lambda crop: one_hot(cases.nearest_colour(crop)))
    sys.modules["open_clip"].get_tokenizer = lambda arch: tokenize
    spec = importlib.util.spec_from_file_location("gen_eval", repo / "reward_server" / "gen_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.DEVICE = "cpu"
    cwd = os.getcwd()
    os.chdir(repo)  # it reads reward_server/object_names.txt from the working directory
    try:
        compute = module.load_geneval()
    finally:
        os.chdir(cwd)
    out = {}
    for name, metadata, objects in cases.CASES:
        image, boxes, masks = cases.render(name, objects, classnames)
        module.inference_detector = lambda model, arrays, b=boxes, m=masks: [(b, m)]
        scores, _, strict, _, _ = compute([Image.fromarray(image)], [metadata], only_strict=True)
        out[name] = {"score": float(scores[0]), "strict": float(strict[0])}
    return out


def main(repo: Path, reward_server: Path) -> None:
    official = import_official(repo)
    official.DEVICE, official.object_detector = "cpu", None
    official.args = types.SimpleNamespace(options={})
    official.clip_model, official.tokenizer = NearestColourCLIP(), tokenize
    official.transform = lambda crop: one_hot(cases.nearest_colour(crop))
    official.THRESHOLD, official.COUNTING_THRESHOLD, official.MAX_OBJECTS, official.NMS_THRESHOLD, official.POSITION_THRESHOLD = 0.3, 0.9, 16, 1.0, 0.1
    official.classnames = [line.strip() for line in (repo / "evaluation" / "object_names.txt").read_text().splitlines()]
    assert list(cases.PROTOTYPES) == official.COLORS
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"geneval_commit": commit, "classnames": official.classnames, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, metadata, objects in cases.CASES:
            image, boxes, masks = cases.render(name, objects, official.classnames)
            path = str(Path(tmp) / "image.png")
            Image.fromarray(image).save(path)
            official.inference_detector = lambda model, filepath, b=boxes, m=masks: (b, m)
            result = official.evaluate_image(path, metadata)
            out["cases"][name] = {"correct": bool(result["correct"]), "reason": result["reason"], "details": json.loads(result["details"])}
    for name, scores in reward_server_scores(reward_server, official.classnames).items():
        out["cases"][name] |= scores
    out["reward_server_commit"] = subprocess.run(["git", "-C", str(reward_server), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (HERE / "data").mkdir(exist_ok=True)
    (HERE / "data" / "geneval_official.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {HERE / 'data' / 'geneval_official.json'}: {sum(c['correct'] for c in out['cases'].values())} of {len(out['cases'])} correct")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

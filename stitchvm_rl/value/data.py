"""Stage 2's training images, streamed: every epoch, every learner rank reads its own slice of a
seeded order through Ray Data, and nothing is materialised.

    source rows (image paths with optional captions; policy samples: made once, see below): small, listed once
      --epoch_rows(seed, epoch, rank)--> this rank's rows of the epoch, in a seeded shuffled order
      --ray.data.from_items(rows).map_batches(ImageRows)--> streamed into the learner:
         {prompt, image (uint8, training resolution), z0 (policy samples: their own latents, float16), reward}

Rows are read and resized by CPU actors; the learner encodes files with the VAE and computes the
teacher's targets from the image on its own GPU (`value.train.Teacher`), so no token map (2.4 MB an
image at CLIP-L/336 in float32) ever travels or is stored. Policy samples are made once, before
stage 2, by GPU actors (`sample_policy`) that write each as a PNG with its latents (float16 .npy) to
the run's storage, and are then read like image files. The order depends only on (seed, epoch), so
a run resumed at any epoch boundary trains on exactly the rows an uninterrupted one does.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


# ---------------------------------------------------------------- sources, checked before any model loads
def scan_image_folder(folder: str, skip_broken: bool = False) -> list[Path]:
    """The readable images of a folder, checked before any work starts (PIL's header check, no
    decode). A broken one stops the job, naming it -- or, with `skip_broken`, is left out and counted."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"image folder '{folder}' does not exist; set data.folder or use data.source=policy")
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    good = _readable(paths, skip_broken, f"'{folder}'")
    if not good:
        raise FileNotFoundError(f"image folder '{folder}' holds no readable .png/.jpg/.webp images")
    return good


def read_jsonl(path: str, skip_broken: bool = False) -> list[dict]:
    """The rows of a JSONL image list: one `{"path": ..., "prompt": ...}` object a line (prompt
    optional; a relative path is relative to the file's folder). Every image must exist and be
    readable -- or, with `skip_broken`, is left out and counted."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"image list '{path}' does not exist; set data.jsonl to a JSONL file of {{\"path\": ..., \"prompt\": ...}} lines")
    rows = []
    for n, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            image = Path(entry["path"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}, line {n}: not a {{\"path\": ..., \"prompt\": ...}} object ({type(err).__name__}: {err})") from None
        image = image if image.is_absolute() else file.parent / image
        if not image.is_file() and not skip_broken:
            raise FileNotFoundError(f"{path}, line {n}: image '{image}' does not exist; fix the path, or set data.skip_broken_images=true to skip such lines")
        rows.append({"path": str(image), "prompt": str(entry.get("prompt", ""))})
    keep = {str(p) for p in _readable([Path(r["path"]) for r in rows if Path(r["path"]).is_file()], skip_broken, f"'{path}'")}
    rows = [r for r in rows if r["path"] in keep]
    if not rows:
        raise FileNotFoundError(f"image list '{path}' names no readable image")
    return rows


def _readable(paths: list[Path], skip_broken: bool, where: str) -> list[Path]:
    from PIL import Image

    good, broken = [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
            good.append(path)
        except Exception as err:  # PIL raises many types for damaged files
            if not skip_broken:
                raise ValueError(f"image '{path}' cannot be read ({type(err).__name__}); remove it, or set data.skip_broken_images=true to skip such files") from None
            broken.append(path)
    if broken:
        warnings.warn(f"skipped {len(broken)} unreadable image(s) of {len(paths)} in {where}, e.g. '{broken[0].name}'", stacklevel=3)
    return good


def source_rows(data, prompts: list[str], seed: int) -> list[dict]:
    """Every training row of a `StitchDataConfig`, before any image is made or read: image paths with
    their captions (folder: none), or the policy's prompts with one noise seed each."""
    from stitchvm_rl.storage import job_path

    if data.source == "folder":  # absolute paths: read on any node
        return [{"path": str(p), "prompt": "", "seed": 0, "latent": ""} for p in scan_image_folder(job_path(data.folder), data.skip_broken_images)]
    if data.source == "jsonl":
        return [{**row, "seed": 0, "latent": ""} for row in read_jsonl(job_path(data.jsonl), data.skip_broken_images)]
    return [{"path": "", "prompt": prompts[n % len(prompts)], "seed": seed * 1_000_003 + n, "latent": ""} for n in range(data.num_images)]


def epoch_rows(rows: list[dict], seed: int, epoch: int, rank: int, world: int, batch_size: int) -> list[dict]:
    """Rank `rank`'s rows of epoch `epoch`: a permutation seeded by (seed, epoch), cut into global
    batches of world x batch_size rows (the last partial one dropped), of which this rank takes its
    batch_size slice. Every rank gets the same number of full batches."""
    order = np.random.default_rng([seed, epoch]).permutation(len(rows))
    steps = len(rows) // (world * batch_size)
    mine = order[: steps * world * batch_size].reshape(steps, world, batch_size)[:, rank].ravel()
    return [rows[n] for n in mine]


# ---------------------------------------------------------------- the Ray Data actors
def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def as_uint8(images: torch.Tensor) -> np.ndarray:
    """[0, 1] images (B, 3, H, W) -> uint8 (B, 3, H, W), a quarter of float32's bytes."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def read_images(paths: list[str], size: int) -> torch.Tensor:
    """Image files (paths or storage URIs) as (n, 3, size, size) in [0, 1] (resized, as the probes and the stream read them)."""
    from PIL import Image

    from stitchvm_rl.storage import read_bytes

    arrays = [np.asarray(Image.open(io.BytesIO(read_bytes(p))).convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0 for p in paths]
    return torch.as_tensor(np.stack(arrays)).permute(0, 3, 1, 2)


class ImageRows:
    """Ray Data actor (CPU): image files (paths or storage URIs) -> uint8 images at the training
    resolution, with the policy sample's own latents where the row names them (+ the analytic reward)."""

    def __init__(self, size: int, analytic: str):
        self.size = size
        self.analytic = None
        if analytic:  # (imported here: a reader that needs no reward starts without diffusers and transformers)
            from stitchvm_rl import rewards

            self.analytic = rewards.ANALYTIC[analytic]

    def __call__(self, batch: dict) -> dict:
        images = read_images([str(p) for p in batch["path"]], self.size)
        prompts = [str(p) for p in batch["prompt"]]
        reward = self.analytic(images, prompts) if self.analytic else torch.zeros(len(images))
        out = {"prompt": np.array(prompts, dtype=object), "image": as_uint8(images), "reward": reward.float().numpy()}
        if any(batch["latent"]):
            from stitchvm_rl.storage import read_bytes

            out["z0"] = np.stack([np.load(io.BytesIO(read_bytes(str(p)))) for p in batch["latent"]])
        return out


class PolicyImages:
    """Ray Data actor (GPU): clean images sampled from the (base) policy, one noise seed per row, with
    the policy's own final latents (the value model must read those, not a VAE re-encoding of the
    decoded image: on the toy world the two differ by 11 %). Called on a batch, it writes each sample
    to `<storage>/<run>/files/samples/` (`storage.RunFiles`) and returns the rows that name them."""

    def __init__(self, backbone: str, steps: int, cfg_scale: float, resolution: int, storage: str = "", run_name: str = ""):
        from stitchvm_rl.policy import SD3Policy
        from stitchvm_rl.storage import RunFiles

        self.policy = SD3Policy.from_pretrained(backbone, device=_device())
        self.steps, self.cfg_scale, self.resolution = steps, cfg_scale, resolution or None
        self.files = RunFiles(storage, run_name) if storage else None

    def sample(self, prompts: list[str], seeds) -> tuple[torch.Tensor, torch.Tensor]:
        """(images in [0, 1], final latents) of `prompts`, each from the noise of its seed."""
        shape = self.policy.latent_shape_at(self.resolution)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        with torch.no_grad():
            traj = self.policy.sample(prompts, self.steps, self.cfg_scale, noise=noise)
            return self.policy.decode(traj.final).float(), traj.final.float()

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        prompts = [str(p) for p in batch["prompt"]]
        images, z0 = self.sample(prompts, batch["seed"])
        paths, latents = [], []
        for seed, image, latent in zip(batch["seed"], as_uint8(images), z0.half().cpu().numpy()):  # float16: SD3 latents are ~N(0, 1)
            png, npy = io.BytesIO(), io.BytesIO()
            Image.fromarray(image.transpose(1, 2, 0)).save(png, format="PNG")  # lossless: the uint8 image itself
            np.save(npy, latent)
            for name, buffer, names in ((f"samples/{seed}.png", png, paths), (f"samples/{seed}.npy", npy, latents)):
                self.files.write_bytes(name, buffer.getvalue())
                names.append(self.files.uri(name))
        return {"path": np.array(paths, dtype=object), "latent": np.array(latents, dtype=object), "prompt": np.array(prompts, dtype=object), "seed": np.asarray(batch["seed"])}


def sample_policy(rows: list[dict], data, backbone: str, storage: str, run_name: str) -> list[dict]:
    """source=policy: the policy's samples of `rows` (prompts + seeds), made once by `data.actors` GPU
    actors and written to the run's storage, with an index written last; a re-run (resume) reads the
    index. Returns the rows that name the samples (read like image files from then on)."""
    import ray

    from stitchvm_rl.storage import RunFiles

    files = RunFiles(storage, run_name)
    index = files.read_bytes("samples/index.jsonl")
    if index is not None:
        return [json.loads(line) for line in index.decode().splitlines()]
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    samples = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // data.batch_size))).map_batches(
        PolicyImages, fn_constructor_args=(backbone, data.sample_steps, data.cfg_scale, data.resolution, storage, run_name),
        batch_size=data.batch_size, compute=ray.data.ActorPoolStrategy(size=data.actors), num_cpus=data.actor_cpus, num_gpus=data.actor_gpus,
    )
    made = [{"path": str(r["path"]), "prompt": str(r["prompt"]), "seed": int(r["seed"]), "latent": str(r["latent"])} for r in samples.iter_rows()]
    files.write_bytes("samples/index.jsonl", "".join(json.dumps(r) + "\n" for r in made).encode())
    return made


def stream(rows: list[dict], data, size: int, analytic: str):
    """A lazy Ray Data dataset of `rows` read by `data.actors` CPU actors, in the rows' order
    (preserve_order: the order is the seeded one of `epoch_rows`). Iterating it streams; it is never
    materialised."""
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    items = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // data.batch_size)))  # a block per batch: one actor call each
    return items.map_batches(ImageRows, fn_constructor_args=(size, analytic), batch_size=data.batch_size, compute=ray.data.ActorPoolStrategy(size=data.actors), num_cpus=data.actor_cpus)

"""Where a run's files live, on one machine or many: the storage rule.

    storage_path      a shared filesystem path, or an object store URI (s3://, gs://), read and
                      written through pyarrow filesystems, as Ray Train does; empty: <output_dir>/ray
    <storage>/<run>/  Ray Train's checkpoints of the run (checkpoint_*/)
    <storage>/<run>/files/
                      everything else the run makes (metrics.jsonl, eval_rewards.jsonl, samples/,
                      lora/, value_model/, ...): written by whichever worker makes it, on any node
    <output_dir>/<run>/
                      the driver's copy, mirrored from files/ when the run ends (`RunFiles.mirror`)

A worker never writes into, or reads from, a path only the driver has. Under `ray job submit` the
driver runs in Ray's temporary copy of the working directory, so relative paths are resolved
against $STITCHVM_JOB_ROOT (default ~/stitchvm-rl, where cluster/*.yaml put the repository) instead
(`job_path`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from stitchvm_rl.config import ConfigError

URI_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "file://")


def is_uri(path: str) -> bool:
    """An object-store (or file://) URI rather than a plain path."""
    return str(path).startswith(URI_SCHEMES)


def in_submitted_job() -> bool:
    """True inside the driver of a `ray job submit` job (its supervisor sets this variable)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def job_path(path: str) -> str:
    """`path` made absolute: URIs stay as they are; a relative path is taken from the working
    directory, or in a submitted job from $STITCHVM_JOB_ROOT (never Ray's temporary copy)."""
    if is_uri(path):
        return path
    p = Path(path).expanduser()
    if not p.is_absolute() and in_submitted_job():
        p = Path(os.environ.get("STITCHVM_JOB_ROOT", "~/stitchvm-rl")).expanduser() / p
    return str(p.resolve())


def storage_root(storage_path: str, output_dir: str) -> str:
    """The storage a run's workers share: `storage_path`, else <output_dir>/ray (one machine only)."""
    return job_path(storage_path) if storage_path else str(Path(job_path(output_dir)) / "ray")


def join(root: str, *parts: str) -> str:
    """`root`/part/... for a path or a URI (a URI's query string, if any, stays at the end)."""
    base, _, query = root.partition("?")
    joined = "/".join([base.rstrip("/"), *parts])
    return f"{joined}?{query}" if query else joined


def filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem behind `root` and the path inside it (credentials and endpoints come
    from the environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...)."""
    if is_uri(root):
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), str(Path(root).resolve())


def check_reachable(root: str, key: str) -> None:
    """A job's config check, before Ray starts and without creating anything: a local path must lie
    under a writable directory; an object store must take (and give back) a probe object. A storage
    that cannot be reached (no bucket, no credentials, a path not mounted) is refused with one
    message naming `key` -- not after the models have loaded."""
    hint = ("give a path every node mounts, or an s3:// / gs:// URI whose bucket exists, with its credentials and endpoint "
            "in the environment of every node (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...: see docs/real-runs.md, 'Storage')")
    if not is_uri(root):
        existing = next(p for p in [Path(root), *Path(root).parents] if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise ConfigError(f"{key}: cannot write under '{root}' ('{existing}' is not a writable directory); {hint}")
        return
    try:
        fs, path = filesystem(root)
        marker = f"{path.rstrip('/')}/.stitchvm-probe-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(marker) as f:
            f.write(b"ok")
        with fs.open_input_stream(marker) as f:
            ok = f.read() == b"ok"
        fs.delete_file(marker)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}: cannot write to '{root}' ({type(err).__name__}: {str(err).splitlines()[0]}); {hint}") from None
    if not ok:
        raise ConfigError(f"{key}: '{root}' did not read back what was written to it")


def node_marker(root: str) -> str:
    """Write a marker under `root` for every node to look for (`runtime.check_every_node_sees`):
    a local path in storage_path is shared only if the other nodes see what the driver wrote."""
    marker = join(root, ".stitchvm-shared")
    fs, path = filesystem(marker)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(b"written by a stitchvm-rl driver; every node must see it")
    return marker


def is_located(source: str) -> bool:
    """A storage URI or an absolute path: something each node must be able to see (names and hub
    ids resolve anywhere)."""
    return is_uri(source) or Path(source).is_absolute()


def local_source(source: str) -> str:
    """A source as the driver passes it to workers: an existing relative path made absolute
    (`job_path`), anything else (a name, a hub id, a URI, an absolute path, nothing) as it is."""
    if not source:
        return source
    if is_uri(source) or Path(source).expanduser().is_absolute():
        return job_path(source)
    candidate = Path(job_path(source))
    return str(candidate) if candidate.exists() else source


class RunFiles:
    """A run's files under <storage>/<run>/files, written from any node. Every write is whole:
    a file goes to a temporary name and is renamed (object stores: one PUT), a directory is
    uploaded under a temporary name and renamed (object stores: files first, its manifest last)."""

    def __init__(self, storage: str, run_name: str):
        self.root = join(storage, run_name, "files")
        self.fs, self.path = filesystem(self.root)
        self.object_store = not isinstance(self.fs, pafs.LocalFileSystem)

    def uri(self, name: str) -> str:
        """Where files/`name` is, as a path or URI any node can read (a source for `local_copy`)."""
        return join(self.root, name)

    def _p(self, name: str) -> str:
        return f"{self.path}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self._p(name)).type != pafs.FileType.NotFound

    def read_bytes(self, name: str) -> bytes | None:
        """The file's bytes, or None when there is none."""
        if not self.exists(name):
            return None
        with self.fs.open_input_stream(self._p(name)) as f:
            return f.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        target = self._p(name)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        if self.object_store:  # a PUT is atomic: readers see the old object or the new one
            with self.fs.open_output_stream(target) as f:
                f.write(data)
            return
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, target)

    def write_json(self, name: str, data: dict) -> None:
        self.write_bytes(name, json.dumps(data, indent=2).encode())

    def append_jsonl(self, name: str, record: dict) -> None:
        """One JSON line more (object stores cannot append: the small file is rewritten whole)."""
        old = self.read_bytes(name) or b""
        self.write_bytes(name, old + (json.dumps(record) + "\n").encode())

    def touch(self, name: str) -> None:
        self.write_bytes(name, b"")

    def upload_file(self, local: Path, name: str) -> None:
        self.write_bytes(name, Path(local).read_bytes())

    def upload_dir(self, local: Path, name: str) -> None:
        """`local` (a finished directory on this node) becomes files/`name`, replacing what was there,
        with a sha256 manifest (`MANIFEST`) that readers on other nodes check (`local_copy`)."""
        local, target = Path(local), self._p(name)
        files = {p.relative_to(local).as_posix(): p for p in sorted(local.rglob("*")) if p.is_file() and p.name != MANIFEST}
        manifest = json.dumps({rel: _sha256_bytes(p.read_bytes()) for rel, p in files.items()}, indent=1).encode()
        if self.object_store:  # no rename of a prefix: the files, then the manifest that marks it complete
            if self.exists(name):
                self.fs.delete_dir(target)
            for rel, p in files.items():
                self.write_bytes(f"{name}/{rel}", p.read_bytes())
            self.write_bytes(f"{name}/{MANIFEST}", manifest)
            return
        tmp = f"{name}.tmp-{uuid.uuid4().hex[:8]}"  # shared filesystem: write aside, then one rename
        for rel, p in files.items():
            self.write_bytes(f"{tmp}/{rel}", p.read_bytes())
        self.write_bytes(f"{tmp}/{MANIFEST}", manifest)
        if self.exists(name):
            self.fs.delete_dir(target)
        self.fs.move(self._p(tmp), target)

    def mirror(self, local_dir: Path) -> Path:
        """Copy every file of the run into `local_dir` (the driver's output_dir/<run>), each file
        written under a temporary name and renamed, so a reader never sees half a file."""
        local_dir = Path(local_dir)
        if not self.exists(""):
            return local_dir
        selector = pafs.FileSelector(self.path, recursive=True)
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.File or ".tmp-" in info.path:
                continue
            target = local_dir / info.path[len(self.path) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.mirror")
            with self.fs.open_input_stream(info.path) as src:
                tmp.write_bytes(src.read())
            os.replace(tmp, target)
        return local_dir


# ---------------------------------------------------------------- sources that resolve on any node
MANIFEST = ".sha256.json"  # {relative path: sha256} of a directory uploaded by `upload_dir`, written last


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_text(source: str, name: str) -> str | None:
    """The text of `name` inside the directory `source` (a path or a URI), or None when absent."""
    fs, path = filesystem(source)
    target = f"{path}/{name}"
    if fs.get_file_info(target).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(target) as f:
        return f.read().decode("utf-8")


def read_bytes(source: str) -> bytes:
    """The bytes of the file at `source` (a path or a URI), read where it is."""
    fs, path = filesystem(source)
    with fs.open_input_stream(path) as f:
        return f.read()


def source_exists(source: str) -> bool:
    """Whether a file or directory is at `source` (a path or a URI)."""
    fs, path = filesystem(source)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def local_copy(source: str, fresh: bool = False) -> str:
    """A storage URI -> this node's copy of it (a file or a directory), downloaded once into the
    node-local cache ($STITCHVM_CACHE/remote/), checked against its manifest (or, without one,
    the sizes the store lists), and renamed into place when complete. Several workers of one node
    asking at once wait on one lock: one downloads, the others read its copy. A plain path is
    returned as it is (it must be present on every node: a shared mount, or the same file everywhere).
    `fresh` downloads again even if a copy is cached (a run that may have changed, not a model)."""
    if not is_uri(source):
        return source
    from filelock import FileLock

    from stitchvm_rl.zoo import cache_dir

    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    root = cache_dir() / "remote"
    root.mkdir(parents=True, exist_ok=True)
    parts = Path(source.partition("?")[0].rstrip("/")).parts
    name = parts[-2] if parts[-1] == "files" and len(parts) > 1 else parts[-1]  # <storage>/<run>/files -> <run>
    target = root / key / name
    target.parent.mkdir(exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if fresh or not target.exists():
            _download(source, target)
    return str(target)


def _download(source: str, target: Path) -> None:
    fs, path = filesystem(source)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"'{source}' does not exist in its storage")
    tmp = target.with_name(f".{target.name}.download-{uuid.uuid4().hex[:8]}")
    try:
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(path) as f:
                data = f.read()
            if len(data) != info.size:
                raise OSError(f"'{source}': read {len(data)} bytes of {info.size}")
            tmp.write_bytes(data)
        else:
            _download_dir(fs, path, source, tmp)
        if target.is_dir():  # a fresh copy replaces the cached one
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _download_dir(fs: pafs.FileSystem, path: str, source: str, tmp: Path) -> None:
    listed = {i.path[len(path) + 1 :]: i.size for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File}
    manifest = None
    if MANIFEST in listed:
        with fs.open_input_stream(f"{path}/{MANIFEST}") as f:
            manifest = json.loads(f.read())
        missing = sorted(set(manifest) - set(listed))
        if missing:
            raise OSError(f"'{source}' is incomplete: {missing[:3]} listed in its {MANIFEST} are missing")
    for rel, size in listed.items():
        if ".tmp-" in rel:
            continue
        with fs.open_input_stream(f"{path}/{rel}") as f:
            data = f.read()
        if len(data) != size or (manifest is not None and rel in manifest and _sha256_bytes(data) != manifest[rel]):
            raise OSError(f"'{source}/{rel}' is truncated or corrupted (its size or sha256 differs from what was uploaded)")
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)

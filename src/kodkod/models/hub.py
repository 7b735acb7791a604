"""The Hugging Face hub through `huggingface_hub`: list a repo's files, download one file.

`HfHub(endpoint)` implements `download.Hub`. The listing is `HfApi.model_info(files_metadata=
True)` (the repo's files with their sizes, and the commit they belong to); a file is fetched
with `hf_hub_download(local_dir=…)`, which writes it to a temporary name and renames it into
place when complete. The library reports each block it reads to a progress-bar class; the
one passed here (`_hook_bar`) forwards the block size to the download's hook, which may raise
to stop the transfer (the library then closes the connection and removes its partial file).

The hub's address is `HF_ENDPOINT` as the process sees it when `HfHub.from_env()` is called
(the library itself reads it only once, at import).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kodkod.models.download import BlockHook, DownloadError, RemoteFile, RepoListing

ENDPOINT_VAR = "HF_ENDPOINT"


class HfHub:
    def __init__(self, endpoint: str | None = None, timeout_s: float | None = None) -> None:
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.timeout_s = timeout_s

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, timeout_s: float | None = None) -> HfHub:
        env = os.environ if env is None else env
        return cls(env.get(ENDPOINT_VAR) or None, timeout_s)

    def list_files(self, repo_id: str, revision: str | None, token: str | None) -> RepoListing:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        api = HfApi(endpoint=self.endpoint)
        try:
            info = api.model_info(
                repo_id, revision=revision, files_metadata=True, token=token, timeout=self.timeout_s
            )
        except RevisionNotFoundError:
            raise DownloadError(f"{repo_id} has no revision {revision!r}") from None
        except RepositoryNotFoundError:
            raise DownloadError(
                f"the repository {repo_id} was not found (a private or gated one needs a token)"
            ) from None
        files = tuple(RemoteFile(s.rfilename, s.size) for s in info.siblings or ())
        return RepoListing(info.sha, files)

    def fetch(
        self,
        repo_id: str,
        path: str,
        revision: str | None,
        token: str | None,
        into: Path,
        on_block: BlockHook,
    ) -> None:
        from huggingface_hub import hf_hub_download

        hf_hub_download(
            repo_id,
            path,
            revision=revision,
            local_dir=into,
            token=token,
            endpoint=self.endpoint,
            tqdm_class=_hook_bar(on_block),
        )


def _hook_bar(on_block: BlockHook) -> Any:
    """A progress-bar class (tqdm's interface, drawing nothing) whose `update` calls `on_block`."""
    from tqdm import tqdm

    class HookBar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if n:
                on_block(int(n))
            return None

    return HookBar

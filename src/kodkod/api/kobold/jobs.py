"""The Kobold job table: running Kobold generations by `genkey`, for abort and check.

Every /api/v1/generate and /api/extra/generate/stream request registers a `KoboldJob` while it
runs and removes it when it ends, however it ends. A job keeps the text its
consumer has passed on so far (what /api/extra/generate/check returns) and knows its engine
request, so /api/extra/abort stops it within one engine step (`EngineClient.abort`); the
request then finishes normally with the text generated until then.

Keys are the client's: two requests may share a genkey (KoboldAI Lite reuses one). `abort`
stops every job with the key; `latest` finds the newest one.

A job belongs to the key that started it (`owner`, a digest of the key; None with auth
disabled): abort and check only see the caller's own jobs, so another key's genkey behaves
exactly like an unknown one (nothing leaks, nothing is aborted). With auth disabled every
caller is None and sees every job.

A request without a genkey is "anonymous" (SillyTavern's KoboldAI Classic mode never sends one,
and on Stop it POSTs /api/extra/abort with no body). An abort or check without a genkey acts on
the anonymous jobs of the same client address only — never on other clients' work.

The app factory builds the one table (`AppState.kobold_jobs`); routes get it with the
`KoboldJobs` dependency. It is only touched from the event loop, so it needs no lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from kodkod.engine.client import EngineClient


@dataclass(slots=True, eq=False)
class KoboldJob:
    genkey: str
    request_id: str  # the engine request id (never the genkey: keys may repeat)
    client_host: str | None
    anonymous: bool  # the request sent no genkey
    engine: EngineClient
    owner: str | None = None  # KeyStore.caller_id of the starter (None: auth disabled)
    pieces: list[str] = field(default_factory=list)
    aborted: bool = False

    @property
    def text(self) -> str:
        if len(self.pieces) > 1:
            self.pieces[:] = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""

    def append(self, text: str) -> None:
        if text:
            self.pieces.append(text)

    def abort(self) -> None:
        """Stop the engine request; its stream then ends with an ABORT finish."""
        if not self.aborted:
            self.aborted = True
            self.engine.abort(self.request_id)


class JobTable:
    """Running Kobold jobs, oldest first."""

    def __init__(self) -> None:
        self._jobs: dict[str, KoboldJob] = {}  # request_id → job, in start order

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: KoboldJob) -> None:
        self._jobs[job.request_id] = job

    def remove(self, job: KoboldJob) -> None:
        self._jobs.pop(job.request_id, None)

    def _matching(
        self, genkey: str | None, client_host: str | None, owner: str | None
    ) -> Iterator[KoboldJob]:
        for job in self._jobs.values():
            if job.owner != owner:
                continue
            if genkey:
                if job.genkey == genkey:
                    yield job
            elif job.anonymous and job.client_host == client_host:
                yield job

    def latest(
        self, genkey: str | None, client_host: str | None, owner: str | None = None
    ) -> KoboldJob | None:
        """The caller's newest job with this genkey (no genkey: this client's newest
        anonymous job)."""
        found = None
        for job in self._matching(genkey, client_host, owner):
            found = job
        return found

    def abort(self, genkey: str | None, client_host: str | None, owner: str | None = None) -> int:
        """Abort the caller's jobs with this genkey (no genkey: this client's anonymous
        jobs)."""
        jobs = list(self._matching(genkey, client_host, owner))
        for job in jobs:
            job.abort()
        return len(jobs)

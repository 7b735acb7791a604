"""scripts/cluster.sh: two kodkod replicas behind HAProxy, as a user runs them (one cluster).

Through HAProxy: 50 mixed requests succeed (streams, completions, a Host name the replicas were
told to admit); a stream's first chunk arrives while the replica is still generating (HAProxy
does not buffer it) and a client that goes away mid-stream stops the generation; the same
`X-Session-Id`, or the same OpenAI `user`, always lands on the same replica
(`X-Kodkod-Instance`) and different ones spread over both; hostile affinity keys are served or
refused by a replica with its error shape; scripts/cluster-admin.sh loads a model on every
replica; a replica killed mid-run is routed around, every later request succeeding; SIGTERM to
cluster.sh stops every process it started. A second, fresh cluster shows the replicas sharing
the one key file they create and Ctrl-C stopping everything. HAProxy comes from the Debian
package: installed here when the tests run as root, else those tests are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.scripts.cluster_run import CLUSTER_SH, Cluster, clean_env, processes_under, running_cluster
from tests.server import ADMIN_KEY, API_KEY, DEFAULT_MODEL, GEMMA_MODEL, REPO

pytestmark = pytest.mark.model

ADMIN_SH = REPO / "scripts" / "cluster-admin.sh"
PUBLIC_NAME = "kodkod.example.test"  # a non-loopback Host the replicas are told to admit
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[Cluster]:
    args = ["--host-name", PUBLIC_NAME, "--host-name", "localhost", "--max-seq-len", "2048"]
    with running_cluster(tmp_path_factory.mktemp("cluster"), 2, keys=True, args=args) as c:
        yield c


def chat(text: str, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, **extra}


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    instance: str
    complete: bool  # a stream ended with [DONE], a completion has choices


def send(client: httpx.Client, kind: str, i: int, headers: dict[str, str] | None = None) -> Answer:
    h = {**AUTH, **(headers or {})}
    if kind == "stream":
        body = chat(f"Count to {i}.", stream=True)
        with client.stream("POST", "/v1/chat/completions", json=body, headers=h) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            done = bool(lines) and lines[-1] == "data: [DONE]"
            return Answer(r.status_code, r.headers.get("x-kodkod-instance", ""), done)
    if kind == "models":
        r = client.get("/v1/models", headers=h)
        return Answer(r.status_code, r.headers.get("x-kodkod-instance", ""), bool(r.json().get("data")))
    if kind == "completion":
        r = client.post("/v1/completions", json={"prompt": f"{i} apples and", "max_tokens": 6}, headers=h)
    else:
        r = client.post("/v1/chat/completions", json=chat(f"Say {i}."), headers=h)
    ok = r.status_code == 200 and bool(r.json().get("choices"))
    return Answer(r.status_code, r.headers.get("x-kodkod-instance", ""), ok)


KINDS = ("chat", "stream", "completion", "models", "chat")


def test_fifty_mixed_requests_through_haproxy_succeed(cluster: Cluster) -> None:
    def one(i: int) -> Answer:
        # every third request names the cluster by the public name clients use
        host = {"Host": f"{PUBLIC_NAME}:{cluster.port}"} if i % 3 == 0 else {}
        with httpx.Client(base_url=cluster.url, timeout=120) as client:
            return send(client, KINDS[i % len(KINDS)], i, host)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, range(50)))
    assert [a.status for a in answers] == [200] * 50, answers
    assert all(a.complete for a in answers), answers
    assert {a.instance for a in answers} == {
        f"{os.uname().nodename}:{cluster.port + 1}",
        f"{os.uname().nodename}:{cluster.port + 2}",
    }
    # a Host the replicas were not told about is still refused, by the replica, through HAProxy
    r = httpx.get(f"{cluster.url}/v1/models", headers={**AUTH, "Host": "evil.example"}, timeout=30)
    assert r.status_code == 400 and "allowed_hosts" in r.text
    assert r.headers["x-kodkod-instance"]


def test_a_stream_reaches_the_client_while_the_replica_still_generates(cluster: Cluster) -> None:
    max_tokens = 1800
    body = chat("Write a long story about a dragon.", max_tokens=max_tokens, stream=True, ignore_eos=True)
    with (
        httpx.Client(base_url=cluster.url, timeout=120) as client,
        client.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r,
    ):
        assert r.status_code == 200
        instance = r.headers["x-kodkod-instance"]
        replica = f"http://127.0.0.1:{int(instance.rsplit(':', 1)[1])}"
        before = httpx.get(f"{replica}/health", timeout=30).json()["engine"]["generated_tokens"]
        lines = r.iter_lines()
        # the first chunk with generated text (not the role chunk, not the end)
        next(line for line in lines if '"content":"' in line and '"content":""' not in line)
        # the reply is not over: the replica that serves it is still running the request
        health = httpx.get(f"{replica}/health", timeout=30).json()
        assert health["engine"]["running"] >= 1, health
    # the client went away mid-stream: HAProxy closes the replica's connection, which aborts the
    # generation long before its max_tokens
    deadline = time.monotonic() + 60
    while (engine := httpx.get(f"{replica}/health", timeout=30).json()["engine"])["running"]:
        assert time.monotonic() < deadline, engine
        time.sleep(0.2)
    assert engine["generated_tokens"] - before < max_tokens, engine


def test_hostile_affinity_keys_are_served_or_refused_cleanly(cluster: Cluster) -> None:
    def post(content: bytes, headers: dict[str, str | bytes] | None = None) -> httpx.Response:
        h = {**AUTH, "Content-Type": "application/json", **(headers or {})}
        return httpx.post(f"{cluster.url}/v1/chat/completions", content=content, headers=h, timeout=120)

    def body(**extra: Any) -> bytes:
        return json.dumps(chat("Hi.", 2, **extra)).encode()

    served = [
        post(body(user="u" * 5000)),  # longer than the stick-table key
        post(body(user="x", padding="p" * 100_000)),  # larger than HAProxy's buffer
        post(body(), {"X-Session-Id": "s" * 2000}),
        post(body(), {"X-Session-Id": "\u00e9t\u00e9 ; , = \"'".encode("latin-1")}),
    ]
    assert [r.status_code for r in served] == [200] * len(served), [r.text[:200] for r in served]
    refused = [
        post(body(user={"nested": [1, 2]})),  # not a string: no affinity, the replica says why
        post(body(user=12.5)),
        post(b'{"messages": [{"role": "user", "content": "Hi."}], "user": "x"'),  # cut short
    ]
    for r in refused:
        assert r.status_code in (400, 422) and "error" in r.json(), r.text
        assert r.headers["x-kodkod-instance"]  # refused by a replica, not by HAProxy
    nul = post(body(user="a\u0000b"))
    assert nul.status_code == 200, nul.text


def instances_per_key(cluster: Cluster, make: Any, keys: list[str], rounds: int) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {k: set() for k in keys}
    with httpx.Client(base_url=cluster.url, timeout=120) as client:
        for _ in range(rounds):
            for key in keys:
                headers, body = make(key)
                r = client.post("/v1/chat/completions", json=body, headers={**AUTH, **headers})
                assert r.status_code == 200, r.text
                seen[key].add(r.headers["x-kodkod-instance"])
    return seen


def test_the_same_session_id_lands_on_the_same_replica(cluster: Cluster) -> None:
    # an odd count: were requests simply alternated over the two replicas, each round would move
    # every session to the other one
    sessions = [f"session-{i}" for i in range(7)]
    seen = instances_per_key(cluster, lambda s: ({"X-Session-Id": s}, chat("Hi.", 2)), sessions, 3)
    assert all(len(v) == 1 for v in seen.values()), seen
    assert len(set.union(*seen.values())) == 2, seen  # different sessions spread over both


def test_the_same_openai_user_lands_on_the_same_replica(cluster: Cluster) -> None:
    users = [f"user-{i}" for i in range(7)]
    seen = instances_per_key(cluster, lambda u: ({}, chat("Hi.", 2, user=u)), users, 3)
    assert all(len(v) == 1 for v in seen.values()), seen
    assert len(set.union(*seen.values())) == 2, seen


def test_cluster_admin_loads_a_model_on_every_replica(cluster: Cluster) -> None:
    def models() -> list[str]:
        names = []
        for port in (cluster.port + 1, cluster.port + 2):
            r = httpx.get(f"http://127.0.0.1:{port}/v1/model", headers=AUTH, timeout=30)
            names.append(r.json()["id"])
        return names

    assert models() == [DEFAULT_MODEL, DEFAULT_MODEL]
    for name in (GEMMA_MODEL, DEFAULT_MODEL):
        done = subprocess.run(
            [str(ADMIN_SH), "--workdir", str(cluster.workdir), "load", name],
            capture_output=True,
            text=True,
            timeout=300,
            env=clean_env(),
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert models() == [name, name]
        assert ADMIN_KEY not in done.stdout + done.stderr
    bad = subprocess.run(
        [str(ADMIN_SH), "--workdir", str(cluster.workdir), "load", "../etc"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "not a model name" in bad.stderr
    missing = subprocess.run(
        [str(ADMIN_SH), "--workdir", str(cluster.workdir), "load", "no-such-model"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1 and f"127.0.0.1:{cluster.port + 1}" in missing.stderr
    assert models() == [DEFAULT_MODEL, DEFAULT_MODEL]
    status = subprocess.run(
        [str(ADMIN_SH), "--workdir", str(cluster.workdir), "status"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert len(status) == 2 and all(f'"id":"{DEFAULT_MODEL}"' in line for line in status), status


def test_a_replica_killed_mid_run_is_routed_around(cluster: Cluster) -> None:
    victim = cluster.replica_pid(2)
    survivor = f"{os.uname().nodename}:{cluster.port + 1}"
    killed = threading.Event()
    results: list[tuple[bool, Answer | str]] = []  # (started after the kill, outcome)
    lock = threading.Lock()

    def one(i: int) -> None:
        after = killed.is_set()
        kind = KINDS[i % len(KINDS)]
        # sessions that were stuck to either replica keep coming
        headers = {"X-Session-Id": f"session-{i % 8}"}
        try:
            with httpx.Client(base_url=cluster.url, timeout=120) as client:
                outcome: Answer | str = send(client, kind, i, headers)
        except httpx.HTTPError as exc:  # a stream cut by the kill
            outcome = repr(exc)
        with lock:
            results.append((after, outcome))
            if len(results) == 8 and not killed.is_set():
                os.kill(victim, signal.SIGKILL)
                killed.set()

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(one, range(40)))
    later = [outcome for after, outcome in results if after]
    assert len(later) >= 20, results
    assert all(isinstance(o, Answer) and o.status == 200 and o.complete for o in later), later
    assert {o.instance for o in later if isinstance(o, Answer)} == {survivor}
    cluster.wait_line(r"replica 2 \(127\.0\.0\.1:\d+\) exited", 30)
    haproxy_log = cluster.workdir / ".cluster" / "logs" / "haproxy.log"
    deadline = time.monotonic() + 30
    while "replicas/r2 is DOWN" not in haproxy_log.read_text():  # its health check noticed
        assert time.monotonic() < deadline, haproxy_log.read_text()
        time.sleep(0.2)
    assert cluster.proc.poll() is None  # the cluster keeps serving with one replica


def test_sigterm_stops_haproxy_and_every_replica(cluster: Cluster) -> None:
    pids = [cluster.replica_pid(1), cluster.haproxy_pid()]
    assert processes_under(cluster.workdir)
    cluster.proc.send_signal(signal.SIGTERM)
    assert cluster.proc.wait(90) == 0, cluster.output
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} outlived cluster.sh"
    assert processes_under(cluster.workdir) == []
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{cluster.url}/health", timeout=5)


def test_a_fresh_cluster_shares_one_new_key_file_and_ctrl_c_stops_it(
    tmp_path: Path, default_gguf: Path
) -> None:
    workdir = tmp_path / "fresh"
    workdir.mkdir()
    with running_cluster(workdir, 2, keys=False, args=[]) as c:
        keys = yaml.safe_load((workdir / "api_tokens.yml").read_text())
        for port in (c.port + 1, c.port + 2):  # both replicas took the one file's keys
            r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"X-Api-Key": keys["api_key"]})
            assert r.status_code == 200, r.text
        assert httpx.get(f"{c.url}/v1/models", headers=AUTH).status_code == 401
        assert processes_under(workdir)
        os.killpg(c.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole job
        assert c.proc.wait(90) == 0, c.output
        assert processes_under(workdir) == []


def test_cluster_sh_explains_a_missing_haproxy_and_bad_arguments(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "uname", "sed"):
        (bin_dir / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    done = subprocess.run(
        ["/bin/bash", str(CLUSTER_SH), "2"], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 3 and "apt-get install haproxy" in done.stderr
    for args, message in (
        (["0"], "number of replicas"),
        (["two"], "number of replicas"),
        (["2", "--port", "65535"], "--port must leave room"),
        (["2", "--host", "0.0.0.0"], "set by cluster.sh"),
    ):
        bad = subprocess.run(
            ["/bin/bash", str(CLUSTER_SH), *args], capture_output=True, text=True, timeout=60
        )
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)

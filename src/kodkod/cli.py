"""Command line: `kodkod [server flags]` serves; `kodkod models fetch` fetches models.

    kodkod [--config PATH] [--port N] [--model-name X] ...   serve (every config key is a flag)
    kodkod models fetch [--gemma] [--embedding] [--all]       put the offline models in model_dir
    kodkod models list                                        list the models in model_dir
    kodkod models download REPO [--include G …] [--exclude G …] [--revision R] [--lora]
                                [--folder-name N]             a Hugging Face repo (HF_ENDPOINT)
    kodkod models derive NAME --type f32|f16|q8_0 [--name N]  another precision of a model
    kodkod check [server flags] [--force]                     one decode of the startup model in a
                                                              child process (start.sh runs it)
    kodkod build-info                                         how llama.cpp was built, and for what
    kodkod rpc-worker [--host H] [--port P] [--threads N] [--mem MB]
                                                              lend this machine's CPU to a server
                                                              (llama.cpp RPC; loopback by default)
    kodkod export-config [--export-path PATH]                 write config_sample.yml
    kodkod export-openapi [--export-path PATH]                write the OpenAPI schema

Start-up problems (bad config.yml, bad api_tokens.yml, missing model_dir, a model that won't
load) end with one clear line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import NoReturn

from kodkod import __version__

log = logging.getLogger("kodkod")


def _fail(message: str, code: int = 2) -> int:
    print(f"kodkod: error: {message}", file=sys.stderr)
    return code


def _load(argv: list[str], parser: argparse.ArgumentParser):
    from kodkod.settings import ConfigError, cli_overrides_from_namespace, load_settings

    ns = parser.parse_args(argv)
    try:
        result = load_settings(None, cli_overrides_from_namespace(ns), os.environ)
    except ConfigError as exc:
        raise SystemExit(_fail(str(exc))) from None
    for warning in result.warnings:
        log.warning("%s", warning)
    return result.settings, ns


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def serve(argv: list[str]) -> int:
    from kodkod.settings import ConfigError, add_cli_arguments, validate_paths

    parser = argparse.ArgumentParser(prog="kodkod", description="kodkod inference server")
    add_cli_arguments(parser)
    settings, _ = _load(argv, parser)
    try:
        validate_paths(settings)
    except ConfigError as exc:
        return _fail(str(exc))
    logging.getLogger().setLevel(logging.INFO)

    from kodkod.auth import AuthConfigError, KeyStore, disable_auth_warning

    keys = KeyStore(Path("api_tokens.yml"), disabled=settings.network.disable_auth)
    try:
        keys.load_or_create()
    except AuthConfigError as exc:
        return _fail(str(exc))
    if settings.network.disable_auth:
        warning = disable_auth_warning(settings.network.host)
        if warning:
            log.warning("%s", warning)
    else:
        print(keys.banner(), flush=True)

    host, port = settings.network.host, settings.network.port
    if not _port_free(host, port):
        if _port_free(host, port + 1):
            log.warning("port %d is busy, using %d", port, port + 1)
            port += 1
        else:
            return _fail(f"ports {port} and {port + 1} on {host} are both busy")

    import uvicorn

    from kodkod.app import create_app
    from kodkod.backends.llamacpp.backend import LlamaCppBackend
    from kodkod.backends.llamacpp.encoder import LlamaEncoder
    from kodkod.backends.loader import load_backend
    from kodkod.http_protocol import bounded_http_protocol

    startup_errors: list[str] = []

    def startup_failed(message: str) -> None:
        startup_errors.append(message)
        server.should_exit = True

    app = create_app(
        settings,
        keys=keys,
        backend_loader=load_backend,
        gpu_available=LlamaCppBackend.supports_gpu_offload(),
        encoder_loader=LlamaEncoder.load,
        on_startup_error=startup_failed,
    )
    limits = settings.limits
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=bounded_http_protocol(limits.header_timeout_s, limits.max_header_bytes),
        access_log=settings.logging.log_requests,
        log_level="info",
        lifespan="on",
        timeout_keep_alive=limits.keep_alive_timeout_s,
        limit_concurrency=limits.max_concurrent_connections or None,
    )
    server = uvicorn.Server(config)
    from kodkod.api.request_log import install_access_log_redaction

    install_access_log_redaction()  # uvicorn's access lines show no key from a query string
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler
    # that was installed before it: make that a no-op, so a graceful stop exits with status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if startup_errors:
        return _fail(startup_errors[0], 1)
    return 0


def check_command(argv: list[str]) -> int:
    """Decode once with the startup model in a child process; non-zero if llama.cpp crashes."""
    from kodkod.settings import add_cli_arguments

    parser = argparse.ArgumentParser(prog="kodkod check", description="check the llama.cpp build")
    add_cli_arguments(parser)
    parser.add_argument("--force", action="store_true", help="check even if it passed before")
    settings, ns = _load(argv, parser)
    name = settings.model.model_name
    if not name:
        print("kodkod check: no startup model (model.model_name) to check")
        return 0

    from kodkod.models.registry import discover
    from kodkod.smoke_check import check

    entry = next((e for e in discover(Path(settings.model.model_dir)) if e.name == name), None)
    if entry is None:
        print(
            f"kodkod check: the startup model {name!r} is not in {settings.model.model_dir}; "
            "the server will say so"
        )
        return 0
    result = check(entry.gguf, force=ns.force)
    if not result.ok:
        return _fail(result.message, 3)
    print(f"kodkod check: {result.message}", flush=True)
    return 0


def build_info_command() -> int:
    from kodkod.backends.llamacpp.system import library_version, system_info
    from kodkod.buildinfo import describe, read_record

    print(f"kodkod {__version__}, llama-cpp-python {library_version()}")
    from kodkod.backends.llamacpp.rpc import rpc_available

    print(describe(read_record()))
    print(f"llama.cpp system info: {system_info()}")
    print(f"RPC backend (rpc_servers, kodkod rpc-worker): {'yes' if rpc_available() else 'no'}")
    return 0


def models_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kodkod models")
    sub = parser.add_subparsers(dest="action", required=True)
    fetch = sub.add_parser("fetch", help="fetch the offline models into model_dir")
    fetch.add_argument("--gemma", action="store_true", help="also Gemma 3 270M (second architecture)")
    fetch.add_argument("--embedding", action="store_true", help="also all-MiniLM-L6-v2")
    fetch.add_argument("--all", action="store_true", help="every model")
    fetch.add_argument("--model-dir", default=None, help="target folder (default: model.model_dir)")
    lst = sub.add_parser("list", help="list the models found in model_dir")
    lst.add_argument("--model-dir", default=None)
    der = sub.add_parser("derive", help="write another precision of a model (llama.cpp quantize)")
    der.add_argument("source", help="model name in model_dir")
    der.add_argument("--type", required=True, choices=["f32", "f16", "q8_0"])
    der.add_argument("--name", default=None, help="new model name (default: SOURCE-TYPE)")
    der.add_argument("--model-dir", default=None)
    from kodkod.models import download_cli

    download_cli.add_arguments(sub.add_parser("download", help="download a Hugging Face repo"))
    ns = parser.parse_args(argv)

    from kodkod.settings import ConfigError, load_settings

    try:
        settings = load_settings(None, None, os.environ).settings
    except ConfigError as exc:
        return _fail(str(exc))
    model_dir = Path(ns.model_dir or settings.model.model_dir)
    if ns.action == "download":
        return download_cli.run(ns, model_dir, Path(ns.model_dir or settings.lora.lora_dir))
    if ns.action == "derive":
        from kodkod.backends.llamacpp.quantize import quantize_model
        from kodkod.models.derive import DeriveError, derive

        try:
            done = derive(model_dir, ns.source, ns.type, ns.name, quantize=quantize_model)
        except DeriveError as exc:
            return _fail(str(exc), 1)
        print(f"{done.name}\t{done.path}{'' if done.created else ' (already there)'}")
        return 0
    if ns.action == "list":
        from kodkod.models.registry import discover

        for entry in discover(model_dir):
            print(f"{entry.name}\t{entry.gguf}")
        return 0

    from kodkod.models.fetch import GEMMA3, MINILM, SMOLLM2, FetchError, fetch_spec
    from kodkod.models.fetch_report import reporter_for

    specs = [SMOLLM2]
    if ns.gemma or ns.all:
        specs.append(GEMMA3)
    if ns.embedding or ns.all:
        specs.append(MINILM)
    model_dir.mkdir(parents=True, exist_ok=True)
    report = reporter_for(sys.stdout)  # a bar per file on a terminal, plain lines otherwise
    try:
        for spec in specs:
            fetch_spec(spec, model_dir, report)
    except FetchError as exc:
        return _fail(str(exc), 1)
    return 0


def export_command(kind: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"kodkod {kind}")
    default = "config_sample.yml" if kind == "export-config" else "openapi.json"
    parser.add_argument("--export-path", default=default)
    parser.add_argument("--api-servers", nargs="+", default=["OAI", "kobold"])
    ns = parser.parse_args(argv)
    from kodkod.fsutil import atomic_write

    if kind == "export-config":
        from kodkod.settings import render_sample_config

        atomic_write(Path(ns.export_path), render_sample_config())
    else:
        from kodkod.app import create_app
        from kodkod.auth import KeyStore
        from kodkod.settings import Settings

        settings = Settings.model_validate({"network": {"api_servers": ns.api_servers}})
        app = create_app(
            settings, keys=KeyStore(Path("api_tokens.yml"), disabled=True), backend_loader=_no_backend
        )
        atomic_write(Path(ns.export_path), json.dumps(app.openapi(), indent=2))
    print(f"wrote {ns.export_path}")
    return 0


def _no_backend(*_: object, **__: object) -> NoReturn:  # pragma: no cover - never called when exporting
    raise RuntimeError("no backend while exporting")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kodkod.backends.llamacpp").setLevel(logging.INFO)
    if args and args[0] in ("--version", "-V"):
        print(f"kodkod {__version__}")
        return 0
    if args and args[0] == "models":
        return models_command(args[1:])
    if args and args[0] == "check":
        return check_command(args[1:])
    if args and args[0] == "build-info":
        return build_info_command()
    if args and args[0] == "rpc-worker":
        from kodkod.rpc_worker import run

        return run(args[1:])
    if args and args[0] in ("export-config", "export-openapi"):
        return export_command(args[0], args[1:])
    if args and args[0] == "serve":
        args = args[1:]
    return serve(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""rpc_servers: validated on every surface, planned as layer shares of the local CPU and each
worker (gpu_split, one amount per device), with one progress note per device."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from kodkod.models.loaded import placement_kwargs
from kodkod.models.loading import build_plan_params, check_block
from kodkod.models.params import GpuPlacement, LoadParamError
from kodkod.models.placement import gpu_placement
from kodkod.models.registry import ModelEntry
from kodkod.rpc_worker import is_loopback, parse_args
from kodkod.settings import Settings
from kodkod.settings.load_param import Section

W1, W2 = "127.0.0.1:50052", "127.0.0.1:50053"


def test_rpc_servers_split_equally_by_default_and_name_each_device() -> None:
    placement, notes = gpu_placement({"rpc_servers": [W1, W2]}, {}, devices_available=False)
    assert placement == GpuPlacement("layer", (1 / 3, 1 / 3, 1 / 3), (W1, W2))
    assert notes == [
        "rpc_servers: this machine's CPU holds 33% of the layers",
        f"rpc_servers: RPC worker {W1} holds 33% of the layers",
        f"rpc_servers: RPC worker {W2} holds 33% of the layers",
    ]


def test_gpu_split_gives_one_share_per_device_local_cpu_first() -> None:
    placement, notes = gpu_placement(
        {"rpc_servers": [W1, W2], "gpu_split": [2.0, 1.0, 1.0], "tensor_parallel": True},
        {},
        devices_available=True,
    )
    assert placement is not None and placement.tensor_split == (0.5, 0.25, 0.25)
    assert placement.split_mode == "layer" and placement.rpc_servers == (W1, W2)
    assert any(n.startswith("tensor_parallel: true ignored") for n in notes)
    assert "rpc_servers: this machine's CPU holds 50% of the layers" in notes
    kwargs = placement_kwargs(_params({"rpc_servers": [W1], "gpu_split": [1, 3]}))
    assert kwargs == {"split_mode": "layer", "tensor_split": (0.25, 0.75), "rpc_servers": (W1,)}


def test_a_gpu_split_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(LoadParamError, match="3 devices"):
        gpu_placement({"rpc_servers": [W1, W2], "gpu_split": [1.0, 1.0]}, {}, devices_available=False)


def test_no_rpc_servers_no_rpc_placement() -> None:
    assert placement_kwargs(_params({})) == {}


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (["localhost"], 'not "host:port"'),
        (["h:0"], 'not "host:port"'),
        (["h:70000"], 'not "host:port"'),
        ([":50052"], 'not "host:port"'),
        (["a b:1"], 'not "host:port"'),
        (["h\x00:1"], 'not "host:port"'),
        ([W1, W1], "listed twice"),
        ([f"h:{p}" for p in range(1, 18)], "at most 16"),
        ("127.0.0.1:50052", "list"),
        ([1], "list"),
    ],
)
def test_bad_rpc_servers_are_refused_on_every_surface(value: object, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        Settings.model_validate({"model": {"rpc_servers": value}})
    with pytest.raises(LoadParamError, match=match):
        check_block({"rpc_servers": value}, Section.MODEL, "tabby_config.yml in m")


def test_the_worker_listens_on_loopback_unless_told_otherwise() -> None:
    ns = parse_args([])
    assert ns.host is None and ns.port == 50052
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")
    for bad in (["--port", "0"], ["--threads", "0"], ["--mem", "-5"], ["--port", "x"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def _params(model: dict[str, object]):
    entry = ModelEntry(name="m", gguf=Path("/nonexistent/m.gguf"), folder=None)
    return build_plan_params(Settings(), entry, model, startup=False)[0]

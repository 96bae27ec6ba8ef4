"""AppConfig: the Serve application's typed arguments reject what they cannot serve, naming the field."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serving.deployments.config import AppConfig

SHIPPED = Path(__file__).resolve().parents[1] / "cluster" / "serve_config.yaml"


def test_shipped_serve_config_parses_with_one_engine_thread():
    args = yaml.safe_load(SHIPPED.read_text())["applications"][0]["args"]
    cfg = AppConfig.from_args(args)
    assert cfg.engine_threads == 1 and cfg.to_args()["engine_threads"] == 1
    assert cfg.ingress == "engine"          # the gRPC proxy streams from the engine replica itself


@pytest.mark.parametrize("bad, field", [
    ({"engine_threads": 0}, "engine_threads"),
    ({"expert_shards": 0}, "expert_shards"),
    ({"dtype": "fp8"}, "dtype"),
    ({"transport": "carrier-pigeon"}, "transport"),
    ({"ingress": "proxy"}, "ingress"),
    ({"stream_chunk_tokens": 0}, "stream_chunk_tokens"),
    ({"head_threads": 0}, "head_threads"),
    ({"wide_step_tokens": 0}, "wide_step_tokens"),
])
def test_invalid_values_name_their_field(bad, field):
    with pytest.raises(ValueError, match=field):
        AppConfig(checkpoint="ckpt", **bad)


def test_unknown_args_are_listed():
    with pytest.raises(ValueError, match=r"unknown application args \['engine_thread'\]"):
        AppConfig.from_args({"checkpoint": "ckpt", "engine_thread": 2})


def test_engine_core_runs_in_its_own_process_by_default_only_with_the_collective_transport():
    assert AppConfig(checkpoint="ckpt", transport="collective").engine_core_process
    assert not AppConfig(checkpoint="ckpt", transport="serve").engine_core_process
    assert not AppConfig(checkpoint="ckpt", transport="local").engine_core_process
    assert AppConfig(checkpoint="ckpt", transport="serve", engine_process=True).engine_core_process
    assert not AppConfig(checkpoint="ckpt", transport="collective", engine_process=False).engine_core_process
    shipped = AppConfig.from_args(yaml.safe_load(SHIPPED.read_text())["applications"][0]["args"])
    assert shipped.engine_process is None and shipped.to_args()["engine_process"] is None

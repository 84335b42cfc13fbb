"""ServeConfig validation, and the declarative Serve config it produces (checked against Ray's own
ServeDeploySchema), including the edits `twotower scale` makes."""

from __future__ import annotations

import copy

import pytest

from twotower.cluster.serve.config import ServeConfig
from twotower.cluster.serve.deploy import scaling_of, serve_deploy_config, set_replicas


def _validate(cfg: dict) -> None:
    schema = pytest.importorskip("ray.serve.schema")
    schema.ServeDeploySchema.model_validate(cfg)


def test_defaults_and_round_trip():
    cfg = ServeConfig(model="/models/m")
    assert ServeConfig.from_dict(cfg.to_dict()) == cfg
    assert (cfg.http_port, cfg.grpc_port, cfg.autoscaling.min_replicas) == (8000, 9000, 1)


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "max_replicas"),
        ({"autoscaling": {"target_ongoing_requests": 0}}, "target_ongoing_requests"),
        ({"http_port": 70000}, "http_port"),
        ({"http_port": 9000, "grpc_port": 9000}, "grpc_port"),
        ({"pair": {"transport": "nccl"}}, "transport"),
        ({"pair": {"micro_batches": 0}}, "micro_batches"),
        ({"defaults": {"gamma": 2.0}}, "gamma"),
        ({"defaults": {"gama": 0.5}}, "defaults"),
        ({"replicas": -1}, "replicas"),
        ({"engine": {"max_num_seqs": 0}}, "max_num_seqs"),
        ({"engine": {"warmup_block_sizes": [0]}}, "warmup_block_sizes"),
        ({"engine": {"eager": "no"}}, "eager"),
        ({"max_queued_requests": 0}, "max_queued_requests"),
        ({"migration_limit": -1}, "migration_limit"),
        ({"migration_limit": True}, "migration_limit"),
        ({"tls_certfile": "/tls/cert.pem"}, "tls_keyfile"),
        ({"drain_timeout_s": -1}, "drain_timeout_s"),
        ({"tls_ca_certs": "/tls/ca.pem"}, "tls_ca_certs"),
        ({"api_keys_file": ""}, "api_keys_file"),
        ({"bogus": 1}, "bogus"),
        ({"pair": {"bogus": 1}}, "bogus"),
    ],
)
def test_invalid_values_name_the_field(raw, field):
    with pytest.raises(ValueError, match=field):
        ServeConfig.from_dict(raw)


def test_deploy_config_is_a_valid_serve_config_and_scales():
    cfg = ServeConfig(model="/models/m", autoscaling={"min_replicas": 1, "max_replicas": 3},
                      pair={"use_gpus": True})  # fmt: skip
    dc = serve_deploy_config(cfg)
    _validate(dc)
    pair = dc["applications"][0]["deployments"][0]
    assert pair["placement_group_bundles"] == [{"CPU": 0.5}, {"GPU": 1.0}, {"GPU": 1.0}]
    assert pair["max_queued_requests"] == 256  # a bounded queue: past it, 429 / RESOURCE_EXHAUSTED at once
    assert pair["graceful_shutdown_timeout_s"] == 120.0  # in-flight streams drain on scale-down
    assert pair["placement_group_strategy"] == "STRICT_PACK"
    assert pair["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in pair
    assert "grpc_options" not in dc  # no Serve gRPC proxy: the Ingress replica listens (serve/app.py)
    args = copy.deepcopy(dc["applications"][0]["args"])
    code_version = _code_version(dc)
    fixed = set_replicas(dc, "twotower", replicas=2)
    _validate(fixed)
    pair = fixed["applications"][0]["deployments"][0]
    # an autoscaled app keeps autoscaling: a fixed count is the bounds 2..2
    assert (pair["autoscaling_config"]["min_replicas"], pair["autoscaling_config"]["max_replicas"]) == (2, 2)
    assert "num_replicas" not in pair and scaling_of(fixed, "twotower") == {"replicas": 2}
    # the args and Serve's code version stay: Serve updates the deployment without restarting replicas
    assert fixed["applications"][0]["args"] == args and _code_version(fixed) == code_version
    auto = set_replicas(fixed, "twotower", min_replicas=1, max_replicas=5)
    _validate(auto)
    pair = auto["applications"][0]["deployments"][0]
    assert pair["autoscaling_config"]["min_replicas"] == 1
    assert pair["autoscaling_config"]["target_ongoing_requests"] == 8.0  # the rest of the settings stay
    assert scaling_of(auto, "twotower") == {"min_replicas": 1, "max_replicas": 5}
    assert auto["applications"][0]["args"] == args and _code_version(auto) == code_version
    bad = (({"min_replicas": 9}, "max_replicas"), ({"replicas": 0}, "replicas: must be an integer >= 1"),
           ({}, "nothing to change"), ({"replicas": 2, "max_replicas": 3}, "exclude each other"))  # fmt: skip
    for kwargs, needle in bad:
        with pytest.raises(ValueError, match=needle):
            set_replicas(auto, "twotower", **kwargs)
    with pytest.raises(ValueError, match="app"):
        set_replicas(auto, "nope", replicas=1)
    # an app deployed with a fixed count takes a new count, and only that
    pinned = serve_deploy_config(ServeConfig(model="/models/m", replicas=1))
    version = _code_version(pinned)
    set_replicas(pinned, "twotower", replicas=3)
    assert pinned["applications"][0]["deployments"][0]["num_replicas"] == 3 and _code_version(pinned) == version
    with pytest.raises(ValueError, match="runs a fixed number of tower pairs"):
        set_replicas(pinned, "twotower", max_replicas=4)


def _code_version(deploy_config: dict) -> str:
    """Serve's code version of the app: when it changes, Serve rebuilds the app and restarts replicas."""
    schema = pytest.importorskip("ray.serve.schema")
    from ray.serve._private.deploy_utils import get_app_code_version

    app = schema.ServeDeploySchema.model_validate(deploy_config).applications[0]
    return get_app_code_version(app)


def test_open_autoscaling_bound_is_what_the_cluster_holds():
    cfg = ServeConfig()
    assert cfg.autoscaling.max_replicas is None
    with pytest.raises(ValueError, match="max_replicas"):
        serve_deploy_config(cfg)  # an open bound must be resolved against a cluster first
    # CPU pairs: 0.5 CPU for the replica + 2 x 0.01 for the towers
    assert cfg.fit_to({"CPU": 2.0}).autoscaling.max_replicas == 3
    assert cfg.fit_to({"CPU": 0.1}).autoscaling.max_replicas == 1  # never below 1
    gpu = ServeConfig(pair={"use_gpus": True}, autoscaling={"min_replicas": 1})
    assert gpu.fit_to({"CPU": 64.0, "GPU": 8.0}).autoscaling.max_replicas == 4  # 2 GPUs per pair
    assert ServeConfig(autoscaling={"max_replicas": 2}).fit_to({"CPU": 64.0}).autoscaling.max_replicas == 2
    _validate(serve_deploy_config(cfg.fit_to({"CPU": 4.0})))


def test_the_import_path_of_configs_deployed_before_the_move_still_resolves():
    pytest.importorskip("ray.serve")
    from twotower.cluster import app as old
    from twotower.cluster.serve import app as new
    from twotower.cluster.serve.deploy import IMPORT_PATH

    assert old.build_app is new.build_app
    assert IMPORT_PATH == "twotower.cluster.serve.app:build_app"


def test_tls_files_become_serve_http_ssl_options():
    cfg = ServeConfig(model="/models/m", tls_certfile="/tls/c.pem", tls_keyfile="/tls/k.pem", tls_ca_certs="/tls/ca",
                      replicas=1)  # fmt: skip
    dc = serve_deploy_config(cfg)
    _validate(dc)
    assert dc["http_options"] == {"host": "127.0.0.1", "port": 8000, "ssl_certfile": "/tls/c.pem",
                                  "ssl_keyfile": "/tls/k.pem", "ssl_ca_certs": "/tls/ca"}  # fmt: skip
    assert "ssl_certfile" not in serve_deploy_config(ServeConfig(model="/m", replicas=1))["http_options"]

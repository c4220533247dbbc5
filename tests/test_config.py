"""Config loading: precedence defaults < YAML < --set, and one-line errors for bad keys and values."""

import dataclasses

import pytest

from lpld_ray.config import (
    Config,
    RecoverConfig,
    config_to_dict,
    load_config,
    result_key_diff,
)
from lpld_ray.errors import ConfigError


def write_yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_precedence_defaults_yaml_set(tmp_path):
    path = write_yaml(tmp_path, "recover:\n  ipc: 7\n  iterations: 30\nseed: 3\n")
    cfg = load_config(path, ["recover.iterations=4000", "recover.crop_scale=[0.3, 0.9]"])
    assert cfg.recover.ipc == 7  # YAML over default
    assert cfg.recover.iterations == 4000  # --set over YAML
    assert cfg.recover.crop_scale == (0.3, 0.9)
    assert cfg.seed == 3
    assert cfg.recover.lr == RecoverConfig().lr  # default kept
    assert cfg.teacher == Config().teacher


def test_sections_are_frozen():
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.recover.ipc = 3  # type: ignore[misc]


def test_float_override_accepts_exponent():
    assert load_config(None, ["recover.lr=1e-3"]).recover.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["recover.iteratons=5"], ["recover.iteratons", "iterations"]),
        (["bogus=1"], ["'bogus'"]),
        (["recover.ipc=0"], ["recover.ipc", "0", ">= 1"]),
        (["recover.ipc=-3"], ["recover.ipc", "-3"]),
        (["recover.iterations=0"], ["recover.iterations", ">= 1"]),
        (["recover.ipc=ten"], ["recover.ipc", "'ten'", "integer"]),
        (["recover.batching=global"], ["recover.batching", "class_wise", "across_classes"]),
        (["recover.crop_scale=[0.9, 0.1]"], ["recover.crop_scale"]),
        (["data.name=cifar"], ["data.name", "fashion_mnist"]),
        (["teacher.arch=vit"], ["teacher.arch", "convnet"]),
        (["recover=3"], ["recover", "mapping"]),
        (["noequals"], ["key=value"]),
    ],
)
def test_bad_values_give_one_line_errors(overrides, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_unknown_key_in_yaml(tmp_path):
    path = write_yaml(tmp_path, "squeeze:\n  batchsize: 10\n")
    with pytest.raises(ConfigError, match="unknown config key 'squeeze.batchsize'"):
        load_config(path)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write_yaml(tmp_path, "a: [1, 2\n"))


def test_result_key_diff_ignores_worker_counts():
    base = config_to_dict(load_config(None))
    workers = config_to_dict(load_config(None, ["runner.num_workers=7", "recover.classes_per_pass=3"]))
    assert result_key_diff(base, workers) == []
    changed = config_to_dict(load_config(None, ["recover.iterations=77", "seed=5"]))
    assert result_key_diff(base, changed) == ["recover.iterations", "seed"]


def test_all_presets_load():
    import glob

    presets = sorted(glob.glob("jobs/configs/*.yaml"))
    assert presets, "no presets found"
    for preset in presets:
        assert isinstance(load_config(preset), Config)


def test_storage_section_validates_and_never_echoes_secrets():
    from lpld_ray.config import redacted

    cfg = load_config(None, ["storage.endpoint_url=http://127.0.0.1:9000", "storage.access_key_id=AKID",
                             "storage.secret_access_key=hunter2-secret"])
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9000"
    assert "hunter2" not in repr(cfg)
    tree = redacted(config_to_dict(cfg))
    assert tree["storage"]["secret_access_key"] == "<redacted>" and tree["storage"]["access_key_id"] == "<redacted>"
    assert config_to_dict(cfg)["storage"]["secret_access_key"] == "hunter2-secret"  # the original is untouched
    with pytest.raises(ConfigError, match=r"'storage.secret_access_key': <redacted> \(allowed: a string\)"):
        load_config(None, ["storage.secret_access_key=12345"])
    with pytest.raises(ConfigError, match="set together with storage.access_key_id"):
        load_config(None, ["storage.secret_access_key=only-half"])
    with pytest.raises(ConfigError, match="storage.endpoint_url"):
        load_config(None, ["storage.endpoint_url=localhost:9000"])
    with pytest.raises(ConfigError, match="at most half of storage.lease_timeout_s"):
        load_config(None, ["storage.lease_timeout_s=10", "storage.lease_refresh_s=6"])


def test_storage_and_failure_budget_do_not_block_a_resume():
    base = config_to_dict(load_config(None))
    moved = config_to_dict(load_config(None, ["storage.endpoint_url=http://other:9000", "storage.retries=9",
                                              "train.max_failures=0"]))
    assert result_key_diff(base, moved) == []


def test_a_run_recorded_before_a_key_existed_resumes_when_the_key_keeps_its_default(tmp_path):
    import yaml

    from lpld_ray.errors import LpldError
    from lpld_ray.store.run_record import check_run_record, write_run_record
    from lpld_ray.store.storage import Store

    store = Store(str(tmp_path))
    write_run_record(store, load_config(None))
    record = yaml.safe_load(store.read_text("run.yaml"))
    del record["config"]["recover"]["precision"]  # as written by a version before recover.precision
    store.write_text("run.yaml", yaml.safe_dump(record))
    assert check_run_record(store, load_config(None))
    with pytest.raises(LpldError, match="different config in recover.precision"):
        check_run_record(store, load_config(None, ["recover.precision=bf16"]))

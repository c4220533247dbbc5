"""Config loading: precedence defaults < YAML < --set, and one-line errors for bad keys and values."""

import pickle

import pytest
from pydantic import ValidationError

from lpld_ray.config import ARCHS, Config, RecoverConfig, StorageConfig, TrainConfig
from lpld_ray.config_io import config_from_dict, config_to_dict, load_config, replace, result_key_diff
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
    with pytest.raises(ValidationError, match="frozen"):
        cfg.recover.ipc = 3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        cfg.seed = 4  # type: ignore[misc]
    assert cfg.recover.ipc == 10 and cfg.seed == 0


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
    from lpld_ray.config_io import redacted

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
    with pytest.raises(LpldError) as err:
        check_run_record(store, load_config(None, ["recover.precision=bf16", "recover.ipc=5"]))
    assert "different config in recover.ipc (was 10, now 5), recover.precision (was 'fp32', now 'bf16'): " in str(err.value)
    assert str(err.value).endswith("or --force-new to delete that run's outputs and start over")


@pytest.mark.parametrize(
    "override, message",
    [
        ("recover.lr=nan", "bad value for 'recover.lr': 'nan' (allowed: a finite number > 0)"),
        ("recover.lr=.inf", "bad value for 'recover.lr': inf (allowed: a finite number > 0)"),
        ("recover.r_bn=inf", "bad value for 'recover.r_bn': 'inf' (allowed: a finite number >= 0)"),
        ("runner.progress_every_s=-.inf", "bad value for 'runner.progress_every_s': -inf (allowed: a finite number > 0)"),
        ("storage.read_timeout_s=.nan", "bad value for 'storage.read_timeout_s': nan (allowed: a finite number > 0)"),
        ("relabel.crop_scale=[.nan, 1.0]", "bad value for 'relabel.crop_scale': [nan, 1.0] (allowed: finite numbers, "
                                           "[lo, hi] with 0.0 <= lo <= hi <= 1.0)"),
        ("recover.betas=[0.5, .inf]", "bad value for 'recover.betas': [0.5, inf] (allowed: two finite numbers in [0, 1))"),
        ("recover.ipc=true", "bad value for 'recover.ipc': True (allowed: an integer >= 1)"),
        ("recover.ipc='3'", "bad value for 'recover.ipc': '3' (allowed: an integer >= 1)"),
        ("recover.ipc=3.0", "bad value for 'recover.ipc': 3.0 (allowed: an integer >= 1)"),
        ("recover.lr=true", "bad value for 'recover.lr': True (allowed: a number > 0)"),
        ("recover.flip=1", "bad value for 'recover.flip': 1 (allowed: true or false)"),
        ("data.num_classes=1", "bad value for 'data.num_classes': 1 (allowed: null or an integer >= 2)"),
        ("train.momentum=1", "bad value for 'train.momentum': 1 (allowed: a number in [0, 1))"),
        ("relabel.cutout_fraction=0", "bad value for 'relabel.cutout_fraction': 0 (allowed: a number in (0, 1])"),
        ("storage.retries=21", "bad value for 'storage.retries': 21 (allowed: an integer in [1, 20])"),
        ("train.warmup_epochs=300", "bad value for 'train.warmup_epochs': 300 (allowed: an integer in [0, train.epochs))"),
        ("recover.crop_scale=[0.5]", "bad value for 'recover.crop_scale': [0.5] (allowed: [lo, hi] with 0.0 <= lo <= hi <= 1.0)"),
        ("teacher.weights=' '", "bad value for 'teacher.weights': ' ' (allowed: null or a path/URI)"),
    ],
)
def test_bad_numbers_types_and_bounds_give_exact_messages(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == message


def test_seed_must_fit_in_64_bits():
    assert load_config(None, [f"seed={2**63 - 1}"]).seed == 2**63 - 1
    for bad in (2**63, 2**70, -1):
        with pytest.raises(ConfigError) as info:
            load_config(None, [f"seed={bad}"])
        assert str(info.value) == f"bad value for 'seed': {bad} (allowed: an integer in [0, 2**63))"


def test_unknown_keys_are_refused_with_the_allowed_names():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.lr=0.1", "train.lrr=0.1"])
    assert str(info.value).startswith("unknown config key 'train.lrr' (allowed in section 'train': arch, epochs, ")
    with pytest.raises(ConfigError, match=r"unknown config key 'colour' \(allowed in the top level: seed, data, "):
        config_from_dict({"colour": "red"})
    with pytest.raises(ConfigError, match=r"unknown config key 'storage.bucket' \(allowed in section 'storage': "):
        StorageConfig(bucket="x")  # a section built on its own names its dotted key too


def test_numbers_take_ints_and_numeric_strings():
    cfg = load_config(None, ["relabel.compression=40", "recover.lr='0.5'", "recover.crop_scale=[0, 1]"])
    assert cfg.relabel.compression == 40.0 and isinstance(cfg.relabel.compression, float)
    assert cfg.recover.lr == 0.5 and cfg.recover.crop_scale == (0.0, 1.0)


def test_sections_built_directly_validate_pickle_and_hash():
    with pytest.raises(ConfigError, match=r"^bad value for 'train.epochs': 0 \(allowed: an integer >= 1\)$"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="at most half of storage.lease_timeout_s"):
        StorageConfig(lease_timeout_s=10.0, lease_refresh_s=6.0)
    cfg = load_config(None, ["recover.ipc=3", "storage.access_key_id=AKID", "storage.secret_access_key=s3cret"])
    back = pickle.loads(pickle.dumps(cfg))
    assert back == cfg and hash(back) == hash(cfg) and back.storage.secret_access_key == "s3cret"
    assert back != load_config(None) and {cfg.recover: 1}[RecoverConfig(ipc=3)] == 1


def test_replace_validates_like_construction():
    cfg = RecoverConfig()
    assert replace(cfg, iterations=20).iterations == 20 and cfg.iterations == 1000
    with pytest.raises(ConfigError, match="'recover.iterations': 0"):
        replace(cfg, iterations=0)


def test_config_to_dict_round_trips_with_lists_for_pairs():
    cfg = load_config(None, ["recover.crop_scale=[0.3, 0.9]", "relabel.compression=40"])
    tree = config_to_dict(cfg)
    assert tree["recover"]["crop_scale"] == [0.3, 0.9] and tree["recover"]["betas"] == [0.5, 0.9]
    assert tree["relabel"]["compression"] == 40.0 and list(tree) == list(Config.model_fields)
    assert config_from_dict(tree) == cfg


def test_one_arch_list():
    from lpld_ray.method import models

    assert models.ARCHS is ARCHS
    assert ARCHS == ("convnet", "convnet_w64", "resnet18", "resnet18_small", "resnet50")
    for arch in ARCHS:
        assert load_config(None, [f"train.arch={arch}"]).train.arch == arch


def test_unreadable_config_files_are_one_line_errors(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("recover:\n  ipc: 10\n  lr: [1, 2\n")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("recover:\n  source: r\xe9el\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not valid YAML at line 4, column 1: expected ',' or '\]'"):
        load_config(str(broken))
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 20\)"):
        load_config(str(latin))
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(str(tmp_path))

"""Bad input to jobs/distill.py: a one-line error naming the value, exit code 2, nothing written. The cases run
``lpld_ray.cli.main`` in this process; one smoke test runs the entry point as a user would. The bad inputs of
issue 18 are in test_bad_inputs.py."""

from __future__ import annotations

import pytest
from conftest import assert_one_line_error, run_cli, tree_snapshot

from lpld_ray.method.models import build_model, save_weights_bytes
from lpld_ray.store.label_table import LABEL_SCHEMA_VERSION

PRESET = "jobs/configs/fashion_mnist.yaml"


@pytest.fixture
def existing_run(tmp_path):
    """A run directory that already holds data; no bad command may touch it."""
    run = tmp_path / "run"
    (run / "images" / "shard-00000").mkdir(parents=True)
    (run / "run.yaml").write_text("schema_version: 1\nconfig: {}\n")
    (run / "images" / "shard-00000" / "00000_0000.png").write_bytes(b"png bytes")
    return run


@pytest.fixture(scope="module")
def three_class_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "teacher3.pt"
    path.write_bytes(save_weights_bytes(build_model("convnet", 3, 1, 28)))
    return path


CASES = {
    "unknown key": (["--set", "recover.iterationz=5"], "recover.iterationz"),
    "ipc zero": (["--set", "recover.ipc=0"], "recover.ipc"),
    "ipc negative": (["--set", "recover.ipc=-2"], "-2"),
    "iterations zero": (["--set", "recover.iterations=0"], "recover.iterations"),
    "dataset missing": (["--set", "data.root=/nonexistent/fmnist"], "/nonexistent/fmnist"),
    "teacher missing": (["--set", "teacher.weights=/nonexistent/teacher.pt"], "/nonexistent/teacher.pt"),
    "unknown stage": (["--stages", "squeeze,distil"], "distil"),
    "bad config file": (["--config", "/nonexistent/x.yaml"], "/nonexistent/x.yaml"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_fails_cleanly(name, existing_run, cli):
    args, fragment = CASES[name]
    before = tree_snapshot(existing_run)
    assert_one_line_error(cli(["--config", PRESET, "--run-dir", str(existing_run), *args]), fragment)
    assert tree_snapshot(existing_run) == before


def test_entry_point_exits_2_with_one_error_line(existing_run):
    """The one subprocess: jobs/distill.py as a user runs it, its exit code and its stderr."""
    before = tree_snapshot(existing_run)
    result = run_cli(["--config", PRESET, "--run-dir", str(existing_run), "--set", "recover.ipc=0"])
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "recover.ipc" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert tree_snapshot(existing_run) == before


def test_teacher_with_wrong_class_count(existing_run, three_class_weights, cli):
    before = tree_snapshot(existing_run)
    outcome = cli(["--run-dir", str(existing_run), "--set", f"teacher.weights={three_class_weights}"])
    assert_one_line_error(outcome, "3 output classes but the dataset has 10")
    assert tree_snapshot(existing_run) == before


def test_unsupported_run_dir_scheme(cli):
    error = assert_one_line_error(cli(["--run-dir", "ftp://host/runs/x"]), "ftp://host/runs/x")
    assert "s3://" in error  # says what is allowed


def test_new_run_dir_not_created_on_bad_input(tmp_path, cli):
    run = tmp_path / "fresh"
    assert_one_line_error(cli(["--run-dir", str(run), "--set", "recover.ipc=0"]), "recover.ipc")
    assert not run.exists()


def committed_shards(run, stage: str, meta: dict | None = None) -> None:
    """The preset's 10 classes in two shards of 5, committed with a placeholder object each."""
    from lpld_ray.store.manifest import ShardWriter
    from lpld_ray.store.storage import Store

    for index in range(2):
        writer = ShardWriter(Store(str(run)), stage, f"shard-{index:05d}")
        writer.put(f"{index * 5:05d}_0000.png" if stage == "images" else "labels.parquet", b"not checked here")
        writer.commit(seed=0, meta=meta)


def test_train_without_labels_names_the_missing_stage(tmp_path, cli):
    run = tmp_path / "images_only"
    committed_shards(run, "images")
    before = tree_snapshot(run)
    error = assert_one_line_error(cli(["--config", PRESET, "--run-dir", str(run), "--stages", "train"]),
                                  "train needs the relabel stage's output")
    assert "labels/shard-00000 is missing" in error
    assert tree_snapshot(run) == before


def test_train_on_labels_of_an_unknown_schema_version_names_the_shard(tmp_path, cli):
    run = tmp_path / "future_labels"
    committed_shards(run, "images")
    committed_shards(run, "labels", {"schema_version": 99, "records": 1})
    before = tree_snapshot(run)
    assert_one_line_error(cli(["--config", PRESET, "--run-dir", str(run), "--stages", "train"]),
                          "train cannot read labels/shard-00000: label schema version 99 is not supported "
                          f"(supported: {LABEL_SCHEMA_VERSION}): run with --stages relabel,train")
    assert tree_snapshot(run) == before


def test_run_record_of_a_newer_schema_is_refused(existing_run, cli):
    (existing_run / "run.yaml").write_text("schema_version: 99\nconfig: {}\n")
    before = tree_snapshot(existing_run)
    assert_one_line_error(cli(["--config", PRESET, "--run-dir", str(existing_run)]), "schema_version 99")
    assert tree_snapshot(existing_run) == before


@pytest.fixture
def aws_env(moto_s3, monkeypatch):
    """Credentials and endpoint the usual AWS way (environment variables, no storage: section); returns a setter
    of the secret. s3fs's cached clients are dropped so that each test's environment is the one used."""
    import s3fs

    def use(secret: str | None = None) -> None:
        for name, value in {"AWS_ACCESS_KEY_ID": moto_s3.access_key, "AWS_SECRET_ACCESS_KEY": secret or moto_s3.secret_key,
                            "AWS_ENDPOINT_URL": moto_s3.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()

    yield use
    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_run_dir_on_a_missing_bucket(aws_env, cli):
    aws_env()
    assert_one_line_error(cli(["--run-dir", "s3://lpld-no-such-bucket/run"]),
                          "bucket 'lpld-no-such-bucket' of run directory 's3://lpld-no-such-bucket/run' does not exist")


def test_s3_wrong_credentials_fail_without_echoing_them(moto_s3, aws_env, cli, monkeypatch):
    import moto.settings

    from lpld_ray.store.storage import Store

    bucket = moto_s3.make_bucket()
    aws_env(secret="wrong-secret-4711")
    with monkeypatch.context() as patch:
        patch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto now checks the keys it is given
        outcome = cli(["--run-dir", f"s3://{bucket}/run"])
    error = assert_one_line_error(outcome, "access denied while listing the bucket of")
    assert "wrong-secret-4711" not in error + outcome[2]
    assert Store(f"s3://{bucket}/run", moto_s3.options()).list("") == []  # nothing was written


def test_force_new_says_it_deletes_an_input_that_exists(tmp_path, cli):
    run = tmp_path / "run"
    committed_shards(run, "images")
    (run / "run.yaml").write_text("schema_version: 1\nconfig: {}\n")
    before = tree_snapshot(run)
    error = assert_one_line_error(cli(["--config", PRESET, "--run-dir", str(run), "--force-new", "--stages",
                                       "relabel,train"]), "relabel needs the teacher stage's output")
    assert "but teacher/model is missing (1 of 1 shards): run with --stages teacher,squeeze,recover,relabel" in error
    error = assert_one_line_error(cli(["--config", PRESET, "--run-dir", str(run), "--force-new", "--stages", "train"]),
                                  "train needs the recover stage's output")
    assert "but images/shard-00000 is deleted by --force-new: run with --stages" in error
    assert tree_snapshot(run) == before

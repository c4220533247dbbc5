"""Student pieces without Ray: the KD loss, the schedule, the job the shared loop trains, and its commit."""


import pytest
import torch

from lpld_ray.config import TrainConfig
from lpld_ray.config_io import load_config
from lpld_ray.errors import ConfigError
from lpld_ray.method.kd import SoftTargetKLLoss
from lpld_ray.method.training import make_optimizer, make_scheduler
from lpld_ray.store.storage import Store


def test_kd_loss_is_zero_only_when_matching():
    loss = SoftTargetKLLoss(temperature=4.0)
    t = torch.randn(8, 10)
    assert loss(t.clone(), t).abs() < 1e-6
    assert loss(torch.randn(8, 10), t) > 1e-3


def test_kd_loss_matches_definition():
    s, t, temp = torch.randn(5, 7), torch.randn(5, 7), 20.0
    p = torch.softmax(t / temp, 1)
    expected = (p * (p.log() - torch.log_softmax(s / temp, 1))).sum(1).mean()
    assert torch.allclose(SoftTargetKLLoss(temp)(s, t), expected, atol=1e-6)


def test_label_smoothing_moves_the_target():
    t = torch.tensor([[10.0, 0.0, 0.0]])
    plain, smooth = SoftTargetKLLoss(1.0), SoftTargetKLLoss(1.0, label_smoothing=0.2)
    uniform = torch.zeros(1, 3)
    assert smooth(uniform, t) < plain(uniform, t)


def test_warmup_then_cosine_to_zero():
    cfg = TrainConfig(epochs=10, warmup_epochs=2, lr=1.0)
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch=5)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1)  # first of 10 warm-up steps
    assert lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[-1] < 0.01 and all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_sgd_option():
    opt = make_optimizer(torch.nn.Linear(2, 2), TrainConfig(optimizer="sgd", lr=0.2, momentum=0.9))
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize(
    "override, key",
    [("relabel.compression=0.5", "relabel.compression"), ("train.temperature=0", "train.temperature"),
     ("train.temperature=-1", "train.temperature"), ("train.epochs=0", "train.epochs")],
)
def test_bad_train_and_relabel_values(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_student_job_schedule_optimizer_and_commit(tmp_path):
    """The student's part of the shared loop: its schedule, its optimizer and the manifest the report reads."""
    from lpld_ray.config import DataConfig
    from lpld_ray.pipeline.student import STUDENT_SHARD, STUDENT_STAGE, StudentJob
    from lpld_ray.store.manifest import current_shard

    cfg = TrainConfig(epochs=10, eval_every=4, checkpoint_every=3, warmup_epochs=1, cpus_per_worker=3)
    job = StudentJob(DataConfig(), cfg, Store(str(tmp_path)), seed=5, ipc=2, inputs="abc")
    assert (job.schedule.epochs, job.schedule.eval_every, job.schedule.checkpoint_every, job.threads) == (10, 4, 3, 3)
    model = torch.nn.Linear(2, 2)
    opt, sched = job.optimizer(model, steps_per_epoch=5)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == pytest.approx(cfg.lr / 5)  # warm-up
    job.commit(model, test_top1=0.5, resumed_from=4, seconds=1.0)
    manifest = current_shard(Store(str(tmp_path)), STUDENT_STAGE, STUDENT_SHARD, "abc")
    assert manifest is not None
    assert (manifest.meta["student_top1"], manifest.meta["resumed_from"], manifest.meta["epochs"]) == (0.5, 4, 10)


def test_pipeline_training_modules_do_not_import_ray():
    import subprocess
    import sys

    code = ("import sys, lpld_ray.pipeline.teacher, lpld_ray.pipeline.student, lpld_ray.method.training; "
            "sys.exit(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

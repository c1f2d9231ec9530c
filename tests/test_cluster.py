"""Cluster recipes: the SLURM scripts parse, build the right command, and a job that gets SIGUSR1 saves a
checkpoint, requeues itself and resumes (SLURM faked: its variables, `srun` and `scontrol`)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").rglob("*.sh")) + sorted((ROOT / "scripts" / "slurm").glob("*.sbatch"))


def _fake_slurm(tmp_path: Path, **extra) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/bash\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "biofm-test",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "SLURM_CPUS_PER_TASK": "1",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "WANDB_MODE": "disabled",
        **extra,
    }


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_parses(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_sbatch_scripts_build_the_fit_command_from_slurm_variables(tmp_path):
    env = _fake_slurm(tmp_path, SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="4", SLURM_CPUS_PER_TASK="8", BIOFM_DRY_RUN="1")
    pre = subprocess.run(
        [
            "bash",
            "scripts/slurm/pretrain.sbatch",
            "configs/pretrain/multimodal.yaml",
            "--data.stores",
            "[s3://bucket/a.zarr]",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert pre.returncode == 0, pre.stderr
    assert pre.stdout.startswith(
        "srun biofm fit -c configs/pretrain/multimodal.yaml --trainer configs/trainer/gpu.yaml"
    )
    for part in (
        "--trainer.num_nodes 2",
        "--trainer.devices 4",
        "--data.num_workers 7",
        "--trainer.default_root_dir runs/biofm-test-4242",
        "s3://bucket/a.zarr",
    ):
        assert part in pre.stdout
    tune = subprocess.run(
        ["bash", "scripts/slurm/finetune.sbatch", "configs/finetune/multimodal.yaml", "pre.ckpt"],
        capture_output=True,
        text=True,
        env={**env, "TRAINER": "configs/trainer/fsdp-gpu.yaml"},
        cwd=ROOT,
    )
    assert tune.returncode == 0 and "--model.init_from pre.ckpt" in tune.stdout
    assert "--trainer configs/trainer/fsdp-gpu.yaml" in tune.stdout
    missing = subprocess.run(
        ["bash", "scripts/slurm/finetune.sbatch", "configs/finetune/multimodal.yaml"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert missing.returncode != 0 and "the pretrained checkpoint" in missing.stderr


@pytest.mark.slow
def _trained(rows: Path) -> list[list[int]]:
    """RowLog(epoch=True) lines: [epoch, global step, rows…]."""
    return [list(map(int, line.split())) for line in rows.read_text().splitlines()] if rows.exists() else []


def test_sigusr1_checkpoints_requeues_and_the_requeued_job_resumes(cohort_store, tmp_path):
    import numpy as np

    run_dir, rows = tmp_path / "run", tmp_path / "rows.txt"
    env = _fake_slurm(tmp_path, RUN_DIR=str(run_dir), TRAINER="configs/trainer/cpu.yaml")
    args = [
        "bash",
        "scripts/slurm/pretrain.sbatch",
        "configs/experiment/synthetic.yaml",
        "--model",
        "configs/model/tiny.yaml",
        "--data.stores",
        f"[{cohort_store.url}]",
        "--data.batch_size",
        "8",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "false",
        "--trainer.callbacks",
        f"[{{class_path: biofm.testing.RowLog, init_args: {{path: {rows}, epoch: true}}}}]",
    ]
    job = subprocess.Popen(
        args + ["--trainer.max_epochs", "200"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        # training has started (the handler is set) and is inside the second epoch
        while not (_trained(rows) and _trained(rows)[-1][0] >= 1 and len(_trained(rows)) % 20 > 5):
            assert job.poll() is None and time.time() < deadline, "the job ended before its second epoch"
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)
        while not ((run_dir / "hpc_ckpt_1.ckpt").exists() and (tmp_path / "scontrol.log").exists()):
            assert job.poll() is None and time.time() < deadline, "no HPC checkpoint after SIGUSR1"
            time.sleep(0.2)
        time.sleep(1.0)  # SLURM kills a requeued job; here: the test does
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]

    from biofm.platform.checkpoint import safe_load

    saved = safe_load(run_dir / "hpc_ckpt_1.ckpt")
    step, epoch = saved["global_step"], saved["epoch"]
    first = _trained(rows)
    rows.unlink()
    epochs = epoch + 2  # the requeued job trains on from where the signal stopped it
    resumed = subprocess.run(
        args + ["--trainer.max_epochs", str(epochs)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        f"Restoring states from the checkpoint path at {run_dir / 'hpc_ckpt_1.ckpt'}" in resumed.stdout + resumed.stderr
    )
    second = _trained(rows)
    # the requeued job's first batch is the one after the checkpoint's step, in the interrupted epoch …
    assert second[0][:2] == [epoch, step + 1]
    # … and over both jobs that epoch trained each training sample once: nothing skipped, nothing twice
    interrupted = [r for line in first if line[0] == epoch and line[1] <= step for r in line[2:]] + [
        r for line in second if line[0] == epoch for r in line[2:]
    ]
    train_rows = set(np.flatnonzero(cohort_store.index("split") == "train").tolist())
    assert len(interrupted) == len(set(interrupted)) == len(train_rows) and set(interrupted) == train_rows
    last = safe_load(run_dir / "checkpoints" / "last.ckpt")
    assert last["epoch"] == epochs - 1 and last["global_step"] > saved["global_step"]


def test_the_fsdp_trainer_config_resolves_to_block_wise_sharding(tmp_path):
    from biofm.platform.model import Block
    from biofm.platform.strategies import BiofmFSDP

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "biofm",
            "fit",
            "--trainer",
            "configs/trainer/fsdp-gpu.yaml",
            "--model",
            "configs/model/tiny.yaml",
            "--data",
            "configs/data/synthetic.yaml",
            "--print_config",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "class_path: biofm.platform.strategies.BiofmFSDP" in done.stdout
    strategy = BiofmFSDP(activation_checkpointing=True)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Block}


def test_the_requeue_signal_is_handled_between_batches_where_weights_and_loader_agree(cohort_store, tmp_path):
    """SIGUSR1 that lands after a step's optimizer update but before the loader has counted the batch (here:
    sent from a callback's batch end, as the SIGUSR1 test's row log runs before `ConfirmTrained`) reaches the
    requeue handler only at the next batch's start, where the step count and the loader's saved position
    agree; handled where it landed, the checkpoint would hold the update but not the batch's place, and the
    requeued job would train that batch twice."""
    from lightning.pytorch import Callback, Trainer

    from biofm.platform.lightning import BiofmDataModule, BiofmModule

    seen = []

    def handler(signum, frame):  # stands for Lightning's SLURM handler, which saves the checkpoint
        seen.append((trainer.global_step, trainer.train_dataloader.state_dict()["step"]))

    class SignalAfterUpdate(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:  # the third update is applied
                os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        data = BiofmDataModule([cohort_store.url], batch_size=16)
        module = BiofmModule(data.schema, d_model=16, depth=1, heads=2, latents=2)
        trainer = Trainer(
            max_steps=5,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            default_root_dir=tmp_path,
            callbacks=[SignalAfterUpdate()],
        )
        trainer.fit(module, datamodule=data)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert seen == [(3, 3)]  # three updates and three batches counted by the loader: they agree

"""Two real DDP processes (gloo, CPU) give the loss and gradients of one process on the same global batch."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from clipkit.config import compose_config
from tests.conftest import TINY

# The paper's ViT (layer norm only: batch norm would make each rank normalise by its own statistics), in
# float64 so that 1e-5 measures the algorithm, not float32 rounding of sums over the batch.
OVERRIDES = [o for o in TINY if not o.startswith(("callbacks.", "trainer.log_every"))] + [
    "data.supersample=1", "model/image=vit_tiny", "precision=64-true"]
WORKER = Path(__file__).with_name("ddp_worker.py")


def run_cli(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``subprocess.run`` for multi-process runs, except that one that hangs fails with every process's Python
    stacks (faulthandler, on SIGABRT to the whole process group: both ranks and their dataloader workers)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:4])} ... hung for {timeout} s; output and stacks:\n{out[-3000:]}\n{err[-12000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(out), *OVERRIDES, f"paths.output_dir={out}/run"]
    env = {**os.environ, "PYTHONPATH": str(WORKER.parents[1])}  # the worker imports tests.conftest
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=out, env=env,
                                start_new_session=True)
    try:
        log, _ = launcher.communicate(timeout=300)
    finally:  # a hung rendezvous must not leave workers behind
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 0, log[-5000:]
    return out


@pytest.mark.parametrize("variant,overrides", [("local_loss", ["objective.local_loss=true"]),
                                               ("global_loss", ["objective.local_loss=false"]),
                                               ("accumulate", ["accumulate=2"])])
def test_two_process_ddp_matches_one_process_on_the_global_batch(ddp_results, variant, overrides, tmp_path):
    result = torch.load(ddp_results / f"{variant}.pt")
    assert result["world"] == 2
    module = instantiate(compose_config([*OVERRIDES, *overrides, f"paths.output_dir={tmp_path}", "~logger"]).module)
    module.double().load_state_dict(result["initial"])
    batch = {k: v.double() if v.is_floating_point() else v for k, v in result["batch"].items()}
    loss, _ = module.objective.loss(batch)  # one process, all 8 samples, no gather
    loss.backward()
    expected = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}

    assert result["loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert set(result["grads"]) == set(expected)  # every parameter, the temperature included
    for name, grad in expected.items():
        torch.testing.assert_close(result["grads"][name], grad, atol=1e-5, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_fit_with_trainer_ddp_from_the_command_line(isolated, launcher):
    """Lightning relaunches `python -m clipkit` for rank 1, or torchrun starts both ranks at once (racing for
    the MLflow store unless only rank 0 opens it); both train, one records and reports."""
    import mlflow

    start = [sys.executable, "-m", "clipkit"] if launcher == "lightning" else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "clipkit"]
    cli = run_cli([*start, "fit", *OVERRIDES, *CLI_EXTRA])
    assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
    assert cli.stdout.count("clipkit fit finished") == 1
    runs = mlflow.MlflowClient(tracking_uri=f"sqlite:///{isolated}/mlflow.db").search_runs(["1"])
    assert len(runs) == 1
    assert runs[0].data.metrics["images_seen"] == 4 * 16 * 2  # steps × batch per process × processes
    assert runs[0].data.params["trainer/strategy/_target_"] == "lightning.pytorch.strategies.DDPStrategy"


CLI_EXTRA = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=4",
             "callbacks.zeroshot.every_n_steps=2", "logger.tracking_uri=sqlite:///mlflow.db", "hydra.run.dir=outputs/ddp"]


@pytest.mark.slow
def test_bad_sample_counts_are_summed_over_processes(isolated):
    """Each rank reads its own shard (in order, less than one pass: every bad sample sits in its first part);
    MLflow gets the skips of both."""
    import mlflow

    from tests.datafiles import MAX_PIXELS, write_shards

    _, skipped = write_shards(isolated / "shards", 2, good_per_shard=40)
    assert len(set(skipped)) > 2
    data = ["data=webdataset", f"data.shards={isolated / 'shards'}", f"data.max_image_pixels={MAX_PIXELS}",
            "data.eval_folders=[]", "data.corpus_size=50", "callbacks.data_health.min_samples=10",
            "callbacks.data_health.max_skip_ratio=0.5", "callbacks.data_health.log_every_n_steps=1",
            "data.samples_per_epoch=64", "data.shuffle=false", "trainer.max_epochs=1"]
    extra = [o for o in CLI_EXTRA if not o.startswith("trainer.max_steps")] + ["trainer.max_steps=100"]
    shared = [o for o in OVERRIDES if not o.startswith("data.supersample")]  # a generated-data option
    cli = run_cli([sys.executable, "-m", "clipkit", "fit", *shared, *extra, *data])
    assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
    (run,) = mlflow.MlflowClient(tracking_uri=f"sqlite:///{isolated}/mlflow.db").search_runs(["1"])
    assert {k: run.data.metrics[f"data/skipped/{k}"] for k in skipped} == {k: float(n) for k, n in skipped.items()}


@pytest.mark.slow
def test_a_two_process_run_resumed_mid_epoch_ends_bitwise_where_the_uninterrupted_one_does(isolated):
    """Each rank's two workers restart at their own positions in their shards (bad samples included), each rank's
    generators and bad-sample counts come back: the checkpoint gathers them from both processes."""
    from tests.datafiles import MAX_PIXELS, write_shards

    write_shards(isolated / "shards", 4, good_per_shard=30)
    data = ["data=webdataset", f"data.shards={isolated / 'shards'}", f"data.max_image_pixels={MAX_PIXELS}",
            "data.eval_folders=[]", "data.corpus_size=50", "data.num_workers=2", "data.shuffle_buffer=8",
            "data.samples_per_epoch=96", "callbacks.data_health.max_skip_ratio=0.5",
            "+model.image.drop_path_rate=0.2"]  # 3 batches per rank per epoch: steps 2 and 4 are mid-epoch
    extra = [o for o in CLI_EXTRA if not o.startswith(("trainer.max_steps", "hydra.run.dir"))] + [
        "trainer.max_steps=6", "callbacks.checkpoint.every_n_train_steps=2", "callbacks.checkpoint.save_top_k=-1",
        f"paths.output_dir={isolated}/run"]
    shared = [o for o in OVERRIDES if not o.startswith("data.supersample")]

    def fit(*more):
        cli = run_cli([sys.executable, "-m", "clipkit", "fit", *shared, *extra, *data, *more])
        assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
        return torch.load(isolated / "run/checkpoints/last.ckpt", weights_only=True)

    whole = fit()
    resumed = fit(f"resume={isolated}/run/checkpoints/step0000004.ckpt")
    assert resumed["global_step"] == 6
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    health = next(k for k in whole["callbacks"] if k.startswith("DataHealth"))
    assert whole["callbacks"][health] == resumed["callbacks"][health]
    assert all(rank["skipped"] for rank in whole["callbacks"][health]["ranks"])  # both ranks met bad samples

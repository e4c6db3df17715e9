"""trainer=fsdp on FSDP2: weight-decay groups decided on whole parameters, and real sharded runs on this CPU (gloo):
two processes on one node, one process on each of two nodes, and a command-line run that evaluates zero-shot
mid-run, checkpoints and resumes exactly."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

from clipkit.config import compose_config
from clipkit.module import decay_groups
from clipkit.strategies import BlockFSDP
from tests.test_distributed import OVERRIDES, run_cli

WORKER = Path(__file__).with_name("fsdp_worker.py")
ROOT = WORKER.parents[1]


def group_names(module, groups: list[dict]) -> list[tuple[float, set[str]]]:
    names = {id(p): n for n, p in module.named_parameters()}
    return [(g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in groups]


def optimiser_groups(module) -> list[tuple[float, set[str]]]:
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)  # all configure_optimizers reads of it
    return group_names(module, module.configure_optimizers()["optimizer"].param_groups)


def test_decay_groups_are_decided_on_whole_parameters_not_on_flat_shards(tiny_cfg):
    """FSDP1 (use_orig_params) showed configure_optimizers each parameter as a 1-D shard: a rule on the shard's
    ndim put every weight in the no-decay group. The groups are now decided on the whole model when it is built."""
    module = instantiate(tiny_cfg("model/image=vit_tiny").module)
    whole = optimiser_groups(module)
    for p in module.parameters():
        p.data = p.data.flatten()  # what FSDP1 exposed
    assert optimiser_groups(module) == whole
    assert whole[0][0] == 0.2 and {"objective.image_proj.weight", "objective.text_proj.weight"} <= whole[0][1]


def test_the_towers_own_exemptions_get_no_decay(tiny_cfg):
    """Gains, biases, the temperature, timm's ``no_weight_decay()`` (position embedding, class token) and the
    transformers text tower's position table get none, as open_clip's towers declare; weights and the token
    table keep it."""
    objective = instantiate(tiny_cfg("model/image=vit_tiny").objective)
    (decay, with_decay), (none, without) = group_names(objective, decay_groups(objective, 0.2))
    assert (decay, none) == (0.2, 0.0)
    assert {"image_tower.model.pos_embed", "image_tower.model.cls_token", "logit_scale",
            "text_tower.model.embeddings.position_embedding.weight"} <= without
    assert all(n in without for n, p in objective.named_parameters() if p.ndim < 2)
    assert {"image_tower.model.patch_embed.proj.weight", "text_proj.weight"} <= with_decay
    assert "text_tower.model.embeddings.token_embedding.weight" in with_decay
    assert with_decay | without == {n for n, _ in objective.named_parameters()}


@pytest.fixture
def one_process_group(tmp_path):
    """A world of one (gloo): enough for fully_shard to build its units in this process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_every_block_of_both_towers_is_its_own_unit_and_the_objective_the_root(tiny_cfg, one_process_group):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from clipkit.strategies import block_types, full_params, shard

    module = instantiate(tiny_cfg("model/image=vit_tiny", "model.image.depth=2").module)
    objective = module.objective
    blocks = [n for n, m in module.named_modules() if isinstance(m, tuple(block_types(objective)))]
    scalars = shard(module, one_process_group)
    units = [n for n, m in module.named_modules() if isinstance(m, FSDPModule)]
    assert sorted(units) == sorted(["objective", *blocks])
    assert {"objective.image_tower.model.blocks.0", "objective.image_tower.model.blocks.1",
            "objective.text_tower.model.encoder.layers.0"} <= set(blocks)
    assert scalars == [objective.logit_scale]  # FSDP2 shards no scalar: kept whole
    assert isinstance(objective.text_proj.weight, DTensor)
    with full_params(module):  # what zero-shot evaluation outside Lightning's step sees
        assert not isinstance(objective.text_proj.weight, DTensor)
    assert isinstance(objective.text_proj.weight, DTensor)


def test_gradient_cache_under_fsdp_is_refused_in_one_line_before_anything_starts(tiny_cfg):
    message = r"accumulate=2 does not run under trainer=fsdp yet: use trainer=ddp"
    with pytest.raises(Exception, match=message):  # the config's strategy: the CLI prints the cause's one line
        instantiate(tiny_cfg("trainer=fsdp", "accumulate=2").trainer.strategy)
    strategy = BlockFSDP()  # built by hand, for a module with its own accumulate
    strategy.connect(instantiate(tiny_cfg("accumulate=2").module))
    with pytest.raises(ValueError, match=f"^{message}"):
        strategy.setup(None)


# -- real sharded runs (gloo, CPU) ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(commands: list[list[str]], cwd: Path, timeout: int = 240) -> None:
    """Start every command (each a torchrun) at once; all must succeed. A hang kills them all."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"}  # the worker imports tests.*
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env,
                              start_new_session=True) for c in commands]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-5000:]


@pytest.fixture(scope="module", params=["one_node_two_processes", "two_nodes"])
def fsdp_result(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    worker = [str(WORKER), str(out), *OVERRIDES, f"paths.output_dir={out}/run"]
    run = [sys.executable, "-m", "torch.distributed.run"]
    if request.param == "one_node_two_processes":
        launch([[*run, "--standalone", "--nproc-per-node", "2", *worker, "trainer.devices=2"]], out)
    else:  # two torchrun invocations, as two machines would start them; c10d rendezvous on one address
        rdzv = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "clipkit-test"]
        launch([[*run, *rdzv, "--node-rank", str(n), *worker, "trainer.devices=1", "trainer.num_nodes=2"]
                for n in (0, 1)], out)
    return torch.load(out / "result.pt")


@pytest.mark.slow
def test_sharded_training_matches_one_process_on_the_global_batch(fsdp_result, tmp_path):
    """Loss and every gradient (gathered from the shards) equal one process's on all 8 samples, in float64; the
    parameters really are sharded; the optimiser's decay groups are the single-process ones."""
    assert fsdp_result["world"] == 2
    module = instantiate(compose_config([*OVERRIDES, f"paths.output_dir={tmp_path}", "~logger"]).module)
    module.double().load_state_dict(fsdp_result["initial"])
    loss, _ = module.objective.loss(fsdp_result["batch"])
    loss.backward()
    expected = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}

    assert fsdp_result["loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert set(fsdp_result["grads"]) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(fsdp_result["grads"][name], grad, atol=1e-5, rtol=0, msg=name)
    # every parameter is a DTensor but the temperature, a scalar FSDP2 cannot shard (kept whole, grads averaged)
    assert set(fsdp_result["sharded"]) == set(expected) - {"objective.logit_scale"}
    single = group_names(module, decay_groups(module.objective, 0.2, module.no_decay))
    assert [(wd, set(names)) for wd, names in fsdp_result["groups"]] == single


@pytest.mark.slow
def test_fit_with_trainer_fsdp_from_the_command_line_evaluates_checkpoints_and_resumes_exactly(isolated):
    """Two processes under torchrun: zero-shot evaluation mid-run (the root units gathered around it), full
    checkpoints that clipkit eval's loader rebuilds on one device, the single-process decay groups in the
    optimiser, and resume=auto from a mid-run checkpoint ending bitwise where the uninterrupted run did."""
    import mlflow

    from clipkit.evaluate import build, load_checkpoint

    fp32 = [o for o in OVERRIDES if not o.startswith("precision")]  # Lightning's FSDP2 refuses 64-true by name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "clipkit",
           "fit", *fp32, "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=4",
           "callbacks.zeroshot.every_n_steps=2", "callbacks.checkpoint.every_n_train_steps=2",
           "callbacks.checkpoint.save_top_k=-1", "logger.tracking_uri=sqlite:///mlflow.db",
           f"paths.output_dir={isolated}/run"]
    cli = run_cli(cmd)
    assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
    assert cli.stdout.count("clipkit fit finished") == 1
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{isolated}/mlflow.db")
    (run,) = client.search_runs(["1"])
    assert run.data.params["trainer/strategy/_target_"] == "clipkit.strategies.BlockFSDP"
    top1 = client.get_metric_history(run.info.run_id, "zeroshot/mean_top1")
    assert sorted(m.step for m in top1) == [2 * 16 * 2, 4 * 16 * 2]  # images seen after steps 2 and 4

    folder = isolated / "run/checkpoints"
    whole = torch.load(folder / "last.ckpt", weights_only=True)
    module = build(*load_checkpoint(folder / "last.ckpt"))  # strict load_state_dict into an unsharded model
    names = [n for n, _ in module.named_parameters()]  # the full optimiser state numbers them in this order
    groups = [(g["weight_decay"], {names[i] for i in g["params"]})
              for g in whole["optimizer_states"][0]["param_groups"]]
    assert groups == group_names(module, decay_groups(module.objective, module.weight_decay, module.no_decay))

    for later in ("last.ckpt", "best.ckpt", "step0000004.ckpt"):  # as if the run had died after step 2
        (folder / later).unlink()
    cli = run_cli([*cmd, "resume=auto"])
    assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
    resumed = torch.load(folder / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4 and whole["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for key, state in whole["optimizer_states"][0]["state"].items():  # AdamW's moments and step counts
        for name, value in state.items():
            assert torch.equal(value, resumed["optimizer_states"][0]["state"][key][name]), (key, name)

"""A process that dies without a word (SIGKILL, the OOM killer, a preempted node) leaves its MLflow run RUNNING:
a relaunch with ``resume=`` and ``clipkit ui`` mark the runs whose recorded process is gone as KILLED."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import mlflow
import pytest

from clipkit.commands.ui import main as ui_main
from clipkit.tracking import mark_dead_runs, process_tags
from clipkit.train import fit


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: no process has this pid now
    return proc.pid


def orphan(client, experiment_id: str, pid: int, host: str | None = None) -> str:
    """A run as a process killed before its first checkpoint leaves it."""
    tags = {"clipkit.host": host or socket.gethostname(), "clipkit.pid": str(pid)}
    return client.create_run(experiment_id, tags=tags).info.run_id


def status(client, run_id: str) -> str:
    return client.get_run(run_id).info.status


def test_only_runs_whose_process_is_gone_on_this_host_are_marked_killed(isolated):
    client = mlflow.MlflowClient(f"sqlite:///{isolated}/mlflow.db")
    eid, other = client.create_experiment("e"), client.create_experiment("other")
    gone = dead_pid()
    dead, live = orphan(client, eid, gone), orphan(client, eid, os.getpid())
    elsewhere = orphan(client, eid, gone, host="another-node")
    untagged = client.create_run(eid).info.run_id
    finished = orphan(client, eid, gone)
    client.set_terminated(finished)
    other_experiment = orphan(client, other, gone)
    assert mark_dead_runs(client, [eid]) == [dead]
    assert status(client, dead) == "KILLED"
    assert [status(client, r) for r in (live, elsewhere, untagged, other_experiment)] == ["RUNNING"] * 4
    assert status(client, finished) == "FINISHED"
    assert mark_dead_runs(client) == [other_experiment]  # no experiments named: all of them


@pytest.mark.slow
def test_a_relaunch_with_resume_auto_marks_the_dead_processs_run_killed_and_records_its_own(tiny_cfg):
    cfg = tiny_cfg("trainer.max_steps=1", "callbacks.zeroshot.every_n_steps=0", "callbacks.export=null",
                   "resume=auto")
    client = mlflow.MlflowClient(str(cfg.logger.tracking_uri))
    died = orphan(client, client.create_experiment(str(cfg.logger.experiment_name)), dead_pid())
    result = fit(cfg)  # no checkpoint to resume: a new run
    assert status(client, died) == "KILLED"
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert {k: run.data.tags[k] for k in process_tags()} == process_tags()


def test_clipkit_ui_marks_dead_processes_runs_killed(isolated, monkeypatch):
    client = mlflow.MlflowClient(f"sqlite:///{isolated}/mlflow.db")  # the store ui serves, from isolated
    died = orphan(client, client.create_experiment("clipkit"), dead_pid())

    class Server:  # no MLflow server: only what ui does before serving
        def __init__(self, cmd):
            self.cmd = cmd

        def wait(self):
            return 0

    monkeypatch.setattr("clipkit.commands.ui.subprocess.Popen", Server)
    assert ui_main([]) == 0
    assert status(client, died) == "KILLED"

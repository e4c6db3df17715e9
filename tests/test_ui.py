"""`python -m clipkit ui` serves the run store on 127.0.0.1 and prints the training-runs address."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ui_serves_the_store_and_prints_the_runs_table_address(isolated):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{isolated}/mlflow.db")  # what the ui serves, from isolated
    experiment_id = client.create_experiment("clipkit")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "clipkit", "ui", f"port={port}"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs" in line, line
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.time() < deadline, "MLflow UI did not answer /health within 90 s"
                assert proc.poll() is None, "the UI process exited"
                time.sleep(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/get?experiment_id={experiment_id}",
                                    timeout=5) as response:
            assert re.search(r'"name":\s*"clipkit"', response.read().decode())
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

"""The command line under torchrun: 2 gloo processes initialize their own group."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SMALL = ["--latent-dim", "2", "--hidden", "16", "--epochs", "2", "--num-samples", "20",
         "--eval-limit", "20", "--quiet"]


def test_ppl_vae_fit_under_torchrun_writes_one_result_and_a_checkpoint(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "ppl_vae", "fit", *SMALL,
         "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test log p(x)") == 1  # rank 0 alone prints
    summary = json.loads((tmp_path / "fit.json").read_text())
    assert summary["test_points"] == 20
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["config"]["latent_dim"] == 2

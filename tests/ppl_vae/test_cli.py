import json
import subprocess
import sys

import pytest
import torch

from ppl_vae import cli

SMALL = ["--latent-dim", "4", "--hidden", "32", "--epochs", "3", "--num-samples", "50",
         "--eval-limit", "40", "--quiet"]

RELOAD = """
import json, sys
import ppl_vae
from ppl_vae import cli
model, guide, cfg = cli.load_checkpoint(sys.argv[1])
x = cli.load_split(cfg, "test", None, limit=40)
print(json.dumps(ppl_vae.diagnostics(model, guide, x, 50, seed=cfg.seed).summary()))
"""


def test_fit_saves_a_checkpoint_that_reproduces_log_px_in_a_new_process(tmp_path, capsys):
    summary = cli.run(["fit", *SMALL, "--out", str(tmp_path)])
    assert "test log p(x)" in capsys.readouterr().out
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["config"]["latent_dim"] == 4 and state["config"]["data_dim"] == 64
    reloaded = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path / "checkpoint.pt")],
        capture_output=True, text=True, check=True,
    )
    again = json.loads(reloaded.stdout.strip().splitlines()[-1])
    assert again["log_marginal"] == summary["log_marginal"]
    assert again["elbo"] == summary["elbo"]
    assert json.loads((tmp_path / "fit.json").read_text())["log_marginal"] == again["log_marginal"]


def test_gaps_writes_json_and_figure(tmp_path, capsys):
    report = cli.run(["gaps", *SMALL, "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "amortization gap" in printed.lower()
    saved = json.loads((tmp_path / "gaps.json").read_text())
    assert saved["amortization_gap"] == pytest.approx(report["amortization_gap"])
    assert (tmp_path / "gaps.png").stat().st_size > 1000


def test_gaps_from_a_checkpoint(tmp_path):
    cli.run(["fit", *SMALL, "--out", str(tmp_path)])
    report = cli.run(["gaps", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--num-samples",
                      "50", "--eval-limit", "20", "--quiet", "--out", str(tmp_path / "g")])
    assert report["num_data"] == 20
    assert report["local_family"] == "diag"


def test_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="dataset"):
        cli.run(["fit", *SMALL, "--dataset", "cifar", "--out", str(tmp_path)])


def test_the_command_reports_bad_input_without_a_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "ppl_vae.cli", "fit", *SMALL, "--dataset", "cifar",
         "--out", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert done.returncode == 2  # as for argparse usage errors
    assert done.stderr.startswith("ppl-vae: error:") and "Traceback" not in done.stderr

import json
import os
import signal
import subprocess
import sys
import time

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


# Issue 9, section 4: every argument and the output folder are checked before training;
# damaged checkpoints and conflicting flags are one line on stderr, exit status 2.

TINY = ["--latent-dim", "2", "--hidden", "16", "--epochs", "2", "--num-samples", "10",
        "--eval-limit", "10", "--quiet"]


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(cli.training, "train", refuse)
    monkeypatch.setattr(cli.ppl_vae, "fit", refuse)


def fails_in_one_line(argv, capsys, *expected):
    with pytest.raises(SystemExit) as caught:
        cli.main(argv)
    err = capsys.readouterr().err
    assert caught.value.code == 2
    assert err.startswith("ppl-vae: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err


@pytest.mark.parametrize("argv, expected", [
    (["fit", "--num-samples", "0"], "--num-samples"),
    (["fit", "--eval-limit", "0"], "--eval-limit"),
    (["gaps", "--guide", "delta"], "--guide delta"),
    (["fit", "--epochs", "0"], "--epochs"),
    (["fit", "--batch-size", "0"], "--batch-size"),
    (["fit", "--latent-dim", "0"], "--latent-dim"),
    (["fit", "--hidden", "32", "0"], "--hidden"),
    (["fit", "--lr", "0"], "--lr"),
    (["fit", "--lr", "inf"], "--lr"),
    (["fit", "--seed", "-1"], "--seed"),
    (["fit", "--checkpoint-every", "0"], "--checkpoint-every"),
    (["fit", "--model", "ppca", "--likelihood", "gaussian"], "--likelihood"),
    (["fit", "--model", "fa", "--likelihood", "bernoulli"], "--likelihood"),
    (["fit", "--particles", "0"], "--particles"),
    (["fit", "--kl-warmup", "-1"], "--kl-warmup"),
    (["fit", "--clip-norm", "-1"], "--clip-norm"),
    (["fit", "--model", "ppca", "--binarize", "dynamic"], "--binarize dynamic"),
    (["fit", "--dataset", "binarized_mnist", "--binarize", "dynamic"], "--binarize dynamic"),
])
def test_bad_arguments_fail_before_training(tmp_path, capsys, no_training, argv, expected):
    fails_in_one_line([*argv, "--quiet", "--out", str(tmp_path)], capsys, expected)


def test_an_out_under_a_regular_file_fails_before_training(tmp_path, capsys, no_training):
    (tmp_path / "file").write_text("x")
    fails_in_one_line(["fit", *TINY, "--out", str(tmp_path / "file" / "run")], capsys,
                      "--out", "is a file")


@pytest.mark.skipif(not os.path.isdir("/sys"), reason="needs a read-only /sys")
def test_an_out_that_cannot_be_written_fails_before_training(capsys, no_training):
    # /sys refuses new folders even to root (chmod does not, and CI may run as root).
    fails_in_one_line(["fit", *TINY, "--out", "/sys/ppl-vae-run"], capsys, "cannot be written")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores chmod")
def test_a_read_only_out_fails_before_training(tmp_path, capsys, no_training):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o500)
    try:
        fails_in_one_line(["fit", *TINY, "--out", str(out)], capsys, "cannot be written")
    finally:
        out.chmod(0o700)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved")
    cli.run(["fit", *TINY, "--out", str(out)])
    return out / "checkpoint.pt"


def damaged(saved, tmp_path, how):
    path = tmp_path / f"{how}.pt"
    data = saved.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b"not a checkpoint at all\n" * 10)
    else:
        state = torch.load(saved, weights_only=True)
        if how == "no-config":
            del state["config"]
        elif how == "wrong-shape":
            state["config"]["latent_dim"] = 3
        elif how == "pickled-object":
            state["config"] = argparse_namespace()
        torch.save(state, path)
    return path


def argparse_namespace():
    import argparse

    return argparse.Namespace(model="vae")


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "no-config", "wrong-shape",
                                 "pickled-object"])
@pytest.mark.parametrize("command", ["fit", "gaps"])
def test_a_damaged_checkpoint_is_one_line_and_exit_2(saved, tmp_path, capsys, how, command):
    path = damaged(saved, tmp_path, how)
    fails_in_one_line([command, "--checkpoint", str(path), "--quiet", "--out",
                       str(tmp_path / "out")], capsys, str(path))


def test_flags_that_conflict_with_a_checkpoint_are_refused(saved, tmp_path, capsys):
    # Before: the flags were silently ignored and the saved VAE evaluated on digits.
    err = fails_in_one_line(["fit", "--checkpoint", str(saved), "--model", "ppca",
                             "--dataset", "binarized_mnist", "--out", str(tmp_path)], capsys)
    assert "--model ppca conflicts" in err and "--model vae" in err
    # Flags that agree with the checkpoint are fine.
    cli.run(["fit", "--checkpoint", str(saved), "--latent-dim", "2", "--num-samples", "10",
             "--eval-limit", "10", "--quiet", "--out", str(tmp_path)])


def test_a_kill_during_a_checkpoint_write_keeps_the_previous_file(saved, tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(saved.read_bytes())
    model, guide, cfg = cli.load_checkpoint(target)

    def killed_mid_write(obj, file, *args, **kwargs):
        (open(file, "wb") if isinstance(file, (str, os.PathLike)) else file).write(b"PK\x03")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        cli.save_checkpoint(target, model, guide, cfg)
    monkeypatch.undo()
    assert target.read_bytes() == saved.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_unexpected_failures_keep_their_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli.training, "train", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["fit", *TINY, "--out", str(tmp_path)])


# Issue 12, section 1: --checkpoint-every, interruption and --resume.


def params_of(path):
    state = torch.load(path, weights_only=True)
    return {**{"m." + k: v for k, v in state["model"].items()},
            **{"g." + k: v for k, v in state["guide"].items()}}


def test_resume_finishes_the_run_like_an_uninterrupted_one(tmp_path, monkeypatch):
    whole = cli.run(["fit", *TINY, "--out", str(tmp_path / "whole")])
    fit = cli.ppl_vae.fit

    def interrupted_fit(*args, **kwargs):
        def stop(step, elbo):
            if step == 20:
                raise KeyboardInterrupt
        return fit(*args, **kwargs, callback=stop)

    monkeypatch.setattr(cli.ppl_vae, "fit", interrupted_fit)
    with pytest.raises(KeyboardInterrupt):
        cli.run(["fit", *TINY, "--checkpoint-every", "7", "--out", str(tmp_path / "cut")])
    monkeypatch.undo()
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 21 and saved["config"]["epochs"] == 2
    resumed = cli.run(["fit", "--resume", str(tmp_path / "cut"), "--num-samples", "10",
                       "--eval-limit", "10", "--quiet"])
    a, b = params_of(tmp_path / "whole" / "checkpoint.pt"), params_of(tmp_path / "cut" /
                                                                       "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["log_marginal"] == whole["log_marginal"]


def test_resume_refuses_conflicting_flags(tmp_path, capsys):
    cli.run(["fit", *TINY, "--out", str(tmp_path)])
    err = fails_in_one_line(["fit", "--resume", str(tmp_path), "--epochs", "5"], capsys)
    assert "--epochs 5 conflicts" in err and "--epochs 2" in err
    fails_in_one_line(["fit", "--resume", str(tmp_path / "nothing")], capsys, "no checkpoint")


def test_sigint_writes_a_checkpoint_says_how_to_resume_and_exits_130(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = ["--latent-dim", "2", "--hidden", "16", "--epochs", "3000", "--batch-size", "500",
            "--quiet", "--out", str(out)]
    child = subprocess.Popen([sys.executable, "-m", "ppl_vae.cli", "fit", *args,
                              "--checkpoint-every", "5"], stderr=subprocess.PIPE, text=True,
                             env=env)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGINT)
    err = child.communicate(timeout=120)[1]
    assert child.returncode == 130, err
    assert "Traceback" not in err and f"ppl-vae fit --resume {out}" in err
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < step < 9000 and f"after step {step}" in err


def test_training_options_reach_fit_and_are_kept_for_resume(tmp_path, monkeypatch):
    seen = {}
    fit = cli.ppl_vae.fit

    def spy(*args, **kwargs):
        seen.update(kwargs)
        seen["x"] = args[2]
        return fit(*args, **kwargs)

    monkeypatch.setattr(cli.ppl_vae, "fit", spy)
    options = ["--objective", "iwae", "--particles", "3", "--kl-warmup", "5",
               "--lr-schedule", "cosine", "--binarize", "dynamic", "--clip-norm", "5"]
    cli.run(["fit", *TINY, *options, "--out", str(tmp_path)])
    assert (seen["objective"], seen["num_particles"], seen["kl_warmup"]) == ("iwae", 3, 5)
    assert (seen["lr_schedule"], seen["binarize"]) == ("cosine", "dynamic")
    assert seen["clip_norm"] == 5.0
    # dynamic binarization trains on the intensities, which fit redraws
    assert ((seen["x"] > 0) & (seen["x"] < 1)).any()
    config = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]
    assert config["objective"] == "iwae" and config["binarize"] == "dynamic"
    assert config["clip_norm"] == 5.0

"""Resumable training: fit(..., checkpoint=, checkpoint_every=, resume=) (issue 12, section 1)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import ppl_vae
from ppl_vae.checkpoint import CheckpointError
from ppl_vae.guides import MLPEncoder
from ppl_vae.models import VAE
from ppl_vae.train import Interrupted

STEPS, BATCH, SEED = 40, 64, 3  # 300 rows: 4 full minibatches and one of 44 per epoch


@pytest.fixture(scope="module")
def x():
    return ppl_vae.load_dataset("digits", split="train", binarize="static")[:300]


def build():
    torch.manual_seed(0)
    return VAE(64, 4, hidden=(32, 32)), MLPEncoder(64, 4, hidden=(32,))


def state(model, guide):
    return {**{"model." + k: v for k, v in model.state_dict().items()},
            **{"guide." + k: v for k, v in guide.state_dict().items()}}


def max_difference(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def uninterrupted(x, jit=True):
    model, guide = build()
    result = ppl_vae.fit(model, guide, x, num_steps=STEPS, batch_size=BATCH, seed=SEED,
                         jit=jit, progress=False)
    return state(model, guide), result


def interrupt_at(step):
    def callback(done, elbo):
        if done == step:
            raise KeyboardInterrupt

    return callback


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("stop", [0, 11, 33])
def test_resume_gives_the_parameters_of_an_uninterrupted_run_bit_for_bit(x, tmp_path, jit,
                                                                          stop):
    expected, reference = uninterrupted(x, jit)
    path = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        ppl_vae.fit(*build(), x, num_steps=STEPS, batch_size=BATCH, seed=SEED, jit=jit,
                    progress=False, checkpoint=path, callback=interrupt_at(stop))
    assert torch.load(path, weights_only=True)["step"] == stop + 1
    torch.manual_seed(12345)  # whatever the process did meanwhile must not matter
    model, guide = build()
    result = ppl_vae.fit(model, guide, x, num_steps=STEPS, batch_size=BATCH, seed=SEED,
                         jit=jit, progress=False, checkpoint=path, resume=True)
    assert max_difference(state(model, guide), expected) == 0.0
    assert result.num_steps == STEPS
    # The traced loss's reported value may differ in its last bits once torch's JIT
    # has optimized the graph (the gradients, hence the parameters, do not).
    np.testing.assert_allclose(result.history, reference.history, rtol=1e-6, atol=0)
    if not jit:
        np.testing.assert_array_equal(result.history, reference.history)


def test_the_checkpoint_holds_the_whole_training_state(x, tmp_path):
    path = tmp_path / "run.pt"
    ppl_vae.fit(*build(), x, num_steps=7, batch_size=BATCH, seed=SEED, progress=False,
                checkpoint=path, checkpoint_every=3, checkpoint_extra={"note": "kept"})
    saved = torch.load(path, weights_only=True)
    assert {"model", "guide", "optimizer", "step", "rng", "batches", "history",
            "note"} <= set(saved)
    assert saved["step"] == 7 and len(saved["history"]) == 7
    assert set(saved["rng"]) >= {"torch", "random", "numpy"}
    assert saved["batches"]["position"] == 2 * BATCH  # 7 steps = 5 + 2 into the 2nd epoch
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_resume_refuses_a_checkpoint_of_another_run(x, tmp_path):
    path = tmp_path / "run.pt"
    ppl_vae.fit(*build(), x, num_steps=3, batch_size=BATCH, seed=SEED, progress=False,
                checkpoint=path)
    with pytest.raises(CheckpointError, match="batch_size=64.*batch_size=32"):
        ppl_vae.fit(*build(), x, num_steps=5, batch_size=32, seed=SEED, progress=False,
                    checkpoint=path, resume=True)
    with pytest.raises(FileNotFoundError, match="resume=True"):
        ppl_vae.fit(*build(), x, num_steps=5, progress=False, checkpoint=tmp_path / "no.pt",
                    resume=True)


CHILD = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    import ppl_vae
    from ppl_vae.train import Interrupted
    sys.path.insert(0, sys.argv[2])
    from test_resume import BATCH, SEED, build

    x = ppl_vae.load_dataset("digits", split="train", binarize="static")[:300]
    def slow(step, elbo):
        time.sleep(0.02)  # leaves the parent time to signal mid-run
    try:
        ppl_vae.fit(*build(), x, num_steps=int(sys.argv[3]), batch_size=BATCH, seed=SEED,
                    progress=False, checkpoint=sys.argv[1], checkpoint_every=2,
                    callback=slow)
    except Interrupted as stop:
        print(stop.step, stop.checkpoint)
        sys.exit(128 + stop.signal)
""")


def test_a_sigterm_d_process_leaves_a_checkpoint_that_resumes_to_the_same_parameters(
        x, tmp_path):
    path, steps = tmp_path / "run.pt", 150
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), os.path.dirname(__file__), str(steps)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not path.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.02)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, err
    stopped = int(out.split()[0])
    assert 0 < stopped < steps
    assert torch.load(path, weights_only=True)["step"] == stopped
    model, guide = build()
    ppl_vae.fit(model, guide, x, num_steps=steps, batch_size=BATCH, seed=SEED,
                progress=False, checkpoint=path, resume=True)
    expected_model, expected_guide = build()
    ppl_vae.fit(expected_model, expected_guide, x, num_steps=steps, batch_size=BATCH,
                seed=SEED, progress=False)
    assert max_difference(state(model, guide), state(expected_model, expected_guide)) == 0.0


def test_a_signal_stops_fit_between_steps_and_raises_interrupted(x, tmp_path):
    path = tmp_path / "run.pt"

    def signal_self(step, elbo):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as caught:
        ppl_vae.fit(*build(), x, num_steps=STEPS, batch_size=BATCH, seed=SEED,
                    progress=False, checkpoint=path, callback=signal_self)
    assert isinstance(caught.value, KeyboardInterrupt)
    assert caught.value.step == 5 and caught.value.checkpoint == path
    assert torch.load(path, weights_only=True)["step"] == 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

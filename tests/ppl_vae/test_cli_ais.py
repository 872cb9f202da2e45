"""ppl-vae gaps --log-px ais."""

import pytest

from ppl_vae import cli

SMALL = ["--latent-dim", "2", "--hidden", "16", "--epochs", "2", "--num-samples", "20",
         "--eval-limit", "12", "--quiet"]


def test_gaps_with_ais_records_the_method_and_settings(tmp_path):
    report = cli.run(["gaps", *SMALL, "--log-px", "ais", "--ais-steps", "5", "--ais-chains",
                      "3", "--out", str(tmp_path)])
    assert report["log_px_method"] == "ais"
    assert report["log_px_settings"] == {"num_steps": 5, "num_chains": 3}
    assert (tmp_path / "gaps.json").exists()


def test_bad_ais_flags_are_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(cli.training, "train",
                        lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises(ValueError, match="ais-steps"):
        cli.run(["gaps", *SMALL, "--log-px", "ais", "--ais-steps", "0", "--out",
                 str(tmp_path)])

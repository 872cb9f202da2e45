"""The prepared GPU run (benchmarks/device_check.sh), dry-run on the CPU: its stages find
the package through links into the checkout, run the CUDA tests and write the benchmark's
JSON where the device tool collects it."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_device_run_works_end_to_end_on_the_cpu(tmp_path):
    out, site = tmp_path / "out", tmp_path / "site"
    env = {**os.environ, "DEVICE": "cpu", "ONLY": "no-such-item", "OUT": str(out),
           "SITE": str(site),
           # python3 there is the one with torch: here, this interpreter's
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh")], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    # The package came from the links, with models/ and guides/ inside it.
    assert f"ppl_vae {site}/ppl_vae/__init__.py" in (out / "env.txt").read_text()
    tests = (out / "cuda_tests.log").read_text()
    count = (REPO / "tests" / "ppl_vae" / "test_cuda.py").read_text().count("\ndef test_")
    assert f"{count} skipped" in tests or f"{count} passed" in tests, tests
    assert "cuda tests: rc 0" in done.stdout
    results = json.loads((out / "speed_cpu.json").read_text())
    assert results["quick"]["meta"]["device"] == "cpu"
    assert results["full"]["meta"]["threads"] == [1]
    assert "speed --quick: rc 0" in done.stdout and "speed full: rc 0" in done.stdout

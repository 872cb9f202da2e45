"""The walk of x through gaps(): its counting on hand-made walks, and a real walk on a toy PPCA."""

import json

import torch

from benchmarks import walk_of_x as walk
from benchmarks.walk_of_x import Stop


def test_counts_on_a_hand_made_walk():
    # a.py (depth 1, 2) -> b.py (3) -> a.py (2: up, a return) -> c.py (3) -> b.py (1: up, a
    # return) -> b.py again collapses into the same entry.
    stops = [Stop("a.py", "f", 1), Stop("a.py", "g", 2), Stop("b.py", "h", 3),
             Stop("a.py", "i", 2), Stop("c.py", "j", 3), Stop("b.py", "k", 1),
             Stop("b.py", "l", 4)]
    entries = walk.collapse(stops)
    assert [[s.function for s in entry] for entry in entries] == [
        ["f", "g"], ["h"], ["i"], ["j"], ["k", "l"]]
    figures = walk.figures(stops)
    assert figures["stops"] == 5
    assert figures["functions"] == 7
    assert figures["files"] == 3
    assert figures["climbs"] == 2  # b(3) -> a(2) and c(3) -> b(1); not a(2) -> b(3)
    assert figures["returns"] == 2
    assert figures["max_entries"] == 2
    assert figures["entries_per_file"] == {"a.py": 2, "b.py": 2, "c.py": 1}


def test_a_sibling_at_the_same_depth_is_no_climb():
    stops = [Stop("a.py", "f", 2), Stop("b.py", "g", 2), Stop("c.py", "h", 2)]
    assert walk.figures(stops)["climbs"] == 0
    assert walk.figures([])["stops"] == 0


def test_what_carries_x():
    x = torch.arange(12.0).reshape(4, 3)
    assert walk.carries(x, x)
    assert walk.carries(x[1:3], x)
    assert walk.carries(x[[3, 0, 3]].clone(), x)  # a copy of rows, in any order
    assert not walk.carries(x.double(), x)  # another dtype
    assert not walk.carries(x[:, :2], x)  # another width
    assert not walk.carries(x + 1, x)  # not rows of x
    assert not walk.carries(x[None], x)  # expanded over particles
    assert not walk.carries(x[:0], x)
    assert not walk.carries([x], x)


def test_arguments_reads_named_star_and_keyword_values():
    seen = {}

    def f(a, *rest, key=None, **more):
        import sys

        seen["values"] = walk._arguments(sys._getframe())

    f(1, 2, 3, key=4, other=5)
    assert seen["values"] == [1, 4, 2, 3, 5]


def test_the_walk_of_a_toy_gaps_call(tmp_path):
    result = walk.measure(num_rows=8)
    functions = [(s["file"], s["function"]) for s in result["walk"]]
    assert ("ppl_vae/gaps.py", "gaps") in functions
    assert ("ppl_vae/estimators.py", "log_weights_trusted") in functions
    assert len(set(functions)) == len(functions)  # each function once
    assert result["stops"] == len(walk.collapse([Stop(**s) for s in result["walk"]]))
    # Pyro calls the model back: only the wider count sees its forward.
    wide = walk.measure(num_rows=8, direct=False)
    assert any(s["function"].endswith(".forward") and s["file"].startswith("models/")
               for s in wide["walk"])
    # The project's density sums call the likelihood's log density themselves (its
    # chunked event sum, without autograd, and the linear-Gaussian's terms): the only
    # models/ code the direct walk sees.
    direct = [s for s in result["walk"] if s["file"].startswith("models/")]
    assert {s["file"] for s in direct} <= {"models/distributions.py",
                                           "models/affine_normal.py"}
    assert not any(s["function"].endswith(".forward") for s in direct)
    out = tmp_path / "walk.json"
    walk.main(["--out", str(out), "--key", "toy"])
    assert json.loads(out.read_text())["toy"]["stops"] >= 1

"""The walk of the data ``x`` through one ``ppl_vae.gaps(...)`` call: how many rooms it visits.

A reader who follows ``x`` through the code should not have to climb back up the stack and
re-enter the same files again and again. This script measures that walk.

Definition
----------
One ``gaps()`` call on a small PPCA (PPCA(5, 2), a LinearEncoder, 40 rows, small budgets)
runs under ``sys.setprofile``. At every Python ``call`` event of a function of the project
(a file under the repository's ``ppl_vae/``, ``models/`` or ``guides/``), the arguments the
function receives are read from its frame: named parameters, and one level into ``*args``
and ``**kwargs``. An argument *carries x* when it is ``x`` itself (identity), or a
two-dimensional Tensor of x's dtype and width whose rows are, each of them, exactly a row
of ``x`` (so ``x[:1]``, ``x[idx]`` and a converted copy count; draws of the latents, the
particle-expanded data and the per-datapoint outputs do not).

- A *stop* is the first call of a function (its code object; a generator resumed later
  is the same function) that receives an argument carrying x and is reached through the
  project's own call sites: every frame between ``gaps()``'s caller and the function is
  the project's (``nn.Module.__call__`` seen through). Where the project hands x to Pyro
  or torch (``poutine.trace(model).get_trace(x)``, an ELBO, ``torch.jit.trace``), what
  they call back (the model's ``forward``, the guide's, the ELBO's terms) is their walk,
  not the project's layout; ``--all`` counts those too. Stops are listed in call order,
  each function once, with their call depth (frames on the stack).
- Consecutive stops in the same file collapse into one *entry* of that file; the figures
  count entries:
  ``stops`` (entries), ``files`` (distinct files), ``climbs`` (*climbs back up*: an entry
  whose first stop is at a smaller call depth than the last stop of the entry before, i.e.
  the walk returned up the stack before going on), ``returns`` (entries into a file already
  left: ``stops - files``) and ``max_entries`` (the most entries of any single file).

Goal (issue 23): at most 12 stops, at most 4 climbs back up, no file entered more than
twice.

    python -m benchmarks.walk_of_x [--out FILE]

``--tree DIR`` measures another checkout (an older commit, say): its ``ppl_vae``,
``models`` and ``guides`` are imported in place of the installed ones.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "walk_of_x.json"
GOAL = {"stops": 12, "climbs": 4, "max_entries": 2}


@dataclass(frozen=True)
class Stop:
    file: str  # relative to the project's root, e.g. "ppl_vae/gaps.py"
    function: str
    depth: int


def collapse(stops: list[Stop]) -> list[list[Stop]]:
    """Consecutive stops in one file as one entry of that file."""
    entries: list[list[Stop]] = []
    for stop in stops:
        if entries and entries[-1][-1].file == stop.file:
            entries[-1].append(stop)
        else:
            entries.append([stop])
    return entries


def figures(stops: list[Stop]) -> dict:
    """Stops (file entries), files, climbs back up, returns and the most entries of a file."""
    entries = collapse(stops)
    pairs = zip(entries, entries[1:], strict=False)
    climbs = sum(after[0].depth < before[-1].depth for before, after in pairs)
    per_file = Counter(entry[0].file for entry in entries)
    return {
        "stops": len(entries),
        "functions": len(stops),
        "files": len(per_file),
        "climbs": climbs,
        "returns": len(entries) - len(per_file),
        "max_entries": max(per_file.values(), default=0),
        "entries_per_file": dict(per_file),
    }


def carries(value, x: torch.Tensor) -> bool:
    """``x`` itself, or a 2-D tensor of x's dtype and width made of rows of x."""
    if value is x:
        return True
    if (not isinstance(value, torch.Tensor) or value.ndim != 2 or value.dtype != x.dtype
            or value.shape[1] != x.shape[1] or len(value) == 0 or value.device != x.device
            or value.is_meta):
        return False
    with torch.no_grad():
        return bool((value.detach()[:, None, :] == x[None]).all(-1).any(1).all())


def _arguments(frame) -> list:
    """The values a function received: its named parameters, and those in *args, **kwargs."""
    code = frame.f_code
    count = code.co_argcount + code.co_kwonlyargcount
    values = [frame.f_locals.get(name) for name in code.co_varnames[:count]]
    if code.co_flags & 0x04:  # CO_VARARGS
        values.extend(frame.f_locals.get(code.co_varnames[count], ()))
        count += 1
    if code.co_flags & 0x08:  # CO_VARKEYWORDS
        values.extend(frame.f_locals.get(code.co_varnames[count], {}).values())
    return values


def _depth(frame) -> int:
    depth = 0
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    return depth


_MODULE_CALL = torch.nn.modules.module.__file__


def _reached_directly(frame, start, rooms) -> bool:
    """True when every frame between ``start`` and ``frame`` is the project's own (seen
    through ``nn.Module.__call__``): x was handed on by the project's call sites."""
    frame = frame.f_back
    while frame is not None and frame is not start:
        name = frame.f_code.co_filename
        if not (name.startswith(rooms) or name == _MODULE_CALL):
            return False
        frame = frame.f_back
    return frame is start


def walk(call, x: torch.Tensor, root: Path, *, direct: bool = True) -> list[Stop]:
    """Run ``call()`` and list the project's functions that receive ``x`` (see above).

    ``direct=False`` also counts the project's functions that Pyro or torch call back.
    """
    rooms = tuple(str(root / name) + "/" for name in ("ppl_vae", "models", "guides"))
    seen: set = set()
    stops: list[Stop] = []
    start = None

    def profile(frame, event, _arg):
        if event != "call":
            return
        code = frame.f_code
        nonlocal start
        if code in seen or not code.co_filename.startswith(rooms):
            return
        if start is None:  # the caller of the first of the project's functions: gaps()'s
            start = frame.f_back
        if direct and not _reached_directly(frame, start, rooms):
            return
        if any(carries(value, x) for value in _arguments(frame)):
            seen.add(code)
            stops.append(Stop(str(Path(code.co_filename).relative_to(root)),
                              getattr(code, "co_qualname", code.co_name), _depth(frame)))

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return stops


def toy_gaps(num_rows: int = 40):
    """One small ``gaps()`` call on PPCA(5, 2) with a LinearEncoder, and its data."""
    import ppl_vae
    from ppl_vae.guides import LinearEncoder
    from ppl_vae.models import PPCA

    torch.manual_seed(0)
    x = torch.randn(num_rows, 2) @ torch.randn(2, 5) + 0.5 * torch.randn(num_rows, 5)
    model, guide = PPCA(5, 2), LinearEncoder(5, 2)

    def call():
        return ppl_vae.gaps(model, guide, x, local="diag", local_steps=20, num_samples=50,
                            seed=0, progress=False)

    return call, x


def measure(num_rows: int = 40, *, direct: bool = True) -> dict:
    import ppl_vae

    root = Path(ppl_vae.__file__).resolve().parent.parent
    call, x = toy_gaps(num_rows)
    stops = walk(call, x, root, direct=direct)
    out = figures(stops)
    out["walk"] = [{"file": s.file, "function": s.function, "depth": s.depth} for s in stops]
    out["goal"] = GOAL
    out["goal_met"] = (out["stops"] <= GOAL["stops"] and out["climbs"] <= GOAL["climbs"]
                       and out["max_entries"] <= GOAL["max_entries"])
    return out


def _print(result: dict) -> None:
    base = min(stop["depth"] for stop in result["walk"])
    for stop in result["walk"]:
        print(f"{'  ' * (stop['depth'] - base)}{stop['file']}: {stop['function']}")
    print(f"{result['stops']} stops ({result['functions']} functions) in {result['files']} "
          f"files, {result['climbs']} climbs back up, {result['returns']} returns; most "
          f"entries of one file {result['max_entries']}: "
          + ", ".join(f"{f} {n}" for f, n in result["entries_per_file"].items() if n > 1))
    print("goal met" if result["goal_met"] else f"goal not met: {result['goal']}")


class _Tree(importlib.abc.MetaPathFinder):
    """Imports ``ppl_vae``, ``ppl_vae.models`` and ``ppl_vae.guides`` from one checkout."""

    def __init__(self, root: Path):
        self.places = {"ppl_vae.models": root / "models", "ppl_vae.guides": root / "guides",
                       "ppl_vae": root / "ppl_vae"}

    def find_spec(self, name, path=None, target=None):
        for package, folder in self.places.items():  # the longest prefixes first
            if name == package or name.startswith(package + "."):
                parts = name[len(package):].lstrip(".").split(".") if name != package else []
                where = folder.joinpath(*parts)
                if (where / "__init__.py").exists():
                    return importlib.util.spec_from_file_location(
                        name, where / "__init__.py", submodule_search_locations=[str(where)])
                if where.with_suffix(".py").exists():
                    return importlib.util.spec_from_file_location(name, where.with_suffix(".py"))
                return None
        return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--key", default="after",
                        help="key of this tree's figures in the results file")
    parser.add_argument("--all", action="store_true", help="count calls made by Pyro too")
    parser.add_argument("--tree", type=Path, help="measure this checkout instead")
    args = parser.parse_args(argv)
    if args.tree is not None:
        sys.meta_path.insert(0, _Tree(args.tree.resolve()))
    result = measure(direct=not args.all)
    _print(result)
    saved = json.loads(args.out.read_text()) if args.out.exists() else {}
    saved[args.key] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(saved, indent=1) + "\n")


if __name__ == "__main__":
    main()

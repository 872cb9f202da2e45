"""One boundary: whatever Pyro program a user passes becomes the engine's model or guide.

Below the public entry points the engine runs every model and guide as
``program(x, idx, num_data)``, with every per-datapoint site in one plate named
``"data"`` at dim -1 whose rows are the dataset rows ``idx`` of ``num_data``
(DESIGN.md). Users write Pyro as Pyro's tutorials do: a function or bound method
``model(x)``, a module whose ``forward(x)`` takes the data alone, parameters from
``pyro.param`` and ``pyro.module`` in Pyro's global param store, a plate of any name
sized by ``x.shape[0]``, an autoguide. :func:`as_model` and :func:`as_guide` turn those
into the engine's form, once per public call:

- :class:`PyroProgram` runs the user's program under :class:`DataPlate`, which makes
  its data plate the engine's: renamed ``"data"``, its subsample the rows of the call,
  and its sites scaled by num_data / rows as Pyro's own subsampling would scale them.
  So a model that knows nothing of minibatches can be trained and evaluated on them.
- It holds the parameters the program uses (found from its trace) as its own, so the
  optimizer, checkpoints and ``frozen`` reach them where Pyro keeps them: training
  leaves the values where the user's own Pyro code reads them.
- Pyro's mean-field autoguides become :class:`~ppl_vae.autoguides.AutoguideView`
  (per-datapoint rows, an exact q(u) for AIS); autoguides that couple datapoints are
  refused as proposals.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor, nn

from ppl_vae.autoguides import as_autoguide_view, is_autoguide
from ppl_vae.guides.latent_space import DATA_PLATE
from ppl_vae.plate_rows import PlateRowsError, checked_indexing, marked
from ppl_vae.seeding import caller_rng_kept
from ppl_vae.structure import check_guide, check_structure

_EXPECTED = (
    "a Pyro program: a function or bound method whose first argument is the data x "
    "(model(x)), an nn.Module whose forward(x) takes x, or a PyroModule following the "
    "library's convention forward(x, idx=None, num_data=None)"
)


def as_programs(model, guide, x: Tensor, *, plate: str | None = None,
                num_data: int | None = None, proposal: bool = True):
    """(model, guide) in the engine's form (see :func:`as_model`, :func:`as_guide`).

    The trace that finds the data plate draws from the model; the caller's random state
    is left as it was, so a seeded call's numbers do not depend on it.
    """
    with caller_rng_kept(_converts(model, guide)):
        model = as_model(model, x, plate=plate, num_data=num_data)
        guide = as_guide(guide, model, x, num_data=num_data, proposal=proposal)
    return model, guide


def _converts(model, guide) -> bool:
    """Whether :func:`as_model` or :func:`as_guide` has work to do (and draws). Programs
    in the engine's form pass through untouched: keeping the random state (70 us, most
    of it numpy's) would buy nothing."""
    return not (follows_convention(model) and (guide is None or follows_convention(guide)))


def as_checked_programs(model, guide, x: Tensor, *, plate: str | None = None):
    """(model, guide, latent space): both in the engine's form, checked as a pair.

    The boundary of a call that estimates per datapoint with ``guide`` as the proposal
    (:func:`ppl_vae.gaps`): :func:`as_model` and :func:`as_guide` on the rows ``x``,
    then the model's structure (``structure.check_structure``) and the guide as a
    proposal (``structure.check_guide``), in that order, so the engine below trusts both.
    """
    required_guide(guide)
    with caller_rng_kept(_converts(model, guide)):
        model = as_model(model, x, plate=plate)
        guide = as_guide(guide, model, x)
    space = check_structure(model, x, unconstrained=True)
    check_guide(model, guide, x, torch.arange(len(x), device=x.device), len(x))
    return model, guide, space


def follows_convention(program) -> bool:
    """True for a module whose ``forward`` takes ``(x, idx, num_data)``: the engine's form."""
    if isinstance(program, PyroProgram):
        return True
    return isinstance(program, nn.Module) and _takes_rows(program)


def _takes_rows(program) -> bool:
    """Whether ``program`` (its ``forward``, for a module) takes ``idx`` and ``num_data``."""
    parameters = _parameters_of(program.forward if isinstance(program, nn.Module) else program)
    return parameters is not None and {"idx", "num_data"} <= set(parameters)


def as_model(model, x: Tensor, *, plate: str | None = None,
             num_data: int | None = None) -> nn.Module:
    """The engine's form of ``model``, after checking it on the data ``x`` (N, D), rows of
    a dataset of ``num_data`` (default N).

    A module of the library's convention is returned as it is. Any other Pyro program
    ``model(x)`` is traced once on ``x`` to find its data plate: the plate around the
    observed sites whose size is N (``plate`` names it instead), and to refuse data
    outside an observed site's support (for example non-binary x for a Bernoulli).
    """
    if follows_convention(model):
        if plate not in (None, DATA_PLATE, getattr(model, "plate", DATA_PLATE)):
            raise ValueError(
                f"plate={plate!r} is for models written as model(x); {type(model).__name__} "
                "follows the library's convention, whose data plate is 'data'"
            )
        return model
    _check_callable(model, "model")
    if plate is not None and not isinstance(plate, str):
        raise ValueError(f"plate must be the name of a plate (a str), got {plate!r}")
    trace = _raw_trace(model, x, "model")
    name = _data_plate(trace, len(x), plate)
    _check_observed(trace, name)
    return PyroProgram(model, name).found_params(x, num_data)


def as_guide(guide, model: nn.Module, x: Tensor, *, num_data: int | None = None,
             proposal: bool = True) -> nn.Module | None:
    """The engine's form of ``guide`` for the (already converted) ``model``.

    Mean-field autoguides (``AutoNormal``, ``AutoDiagonalNormal``) become per-datapoint
    guides; with ``proposal=True`` an autoguide that couples datapoints is refused,
    since it has no per-datapoint log q.
    """
    if guide is None or follows_convention(guide):
        return guide
    _check_callable(guide, "guide")
    plate = getattr(model, "plate", DATA_PLATE)
    num_data = num_data or len(x)
    if is_autoguide(guide):
        view = as_autoguide_view(guide, model, x, plate, num_data, proposal=proposal)
        if view is not None:
            return view
    return PyroProgram(guide, plate).found_params(x, num_data)


class DataPlate(Messenger):
    """Make the program's plate ``name`` the engine's ``"data"`` plate for one call.

    The plate's own subsample site is renamed ``"data"`` and given the dataset indices
    ``idx`` of the call's rows, whether the plate is sized by the dataset or by
    ``x.shape[0]``: a per-datapoint array indexed by the plate then reads each row's own
    values, as in a call on the whole dataset (:mod:`ppl_vae.plate_rows` refuses, at the
    boundary, indexing anything else with them). Every site inside it gets the
    ``"data"`` frame, and a scale of num_data / rows overall, the factor Pyro's
    subsampling applies, so a minibatch estimates the whole set.
    """

    def __init__(self, name: str, num_data: int, idx: Tensor):
        super().__init__()
        self.name, self.num_data, self.idx = name, num_data, idx

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and isinstance(msg["fn"], _Subsample):
            if msg["name"] == self.name:
                self._hand_rows(msg)
            return
        frames = msg["cond_indep_stack"]
        for i, frame in enumerate(frames):
            if frame.name == self.name:
                full = frame.full_size or frame.size
                renamed = frame._replace(name=DATA_PLATE, full_size=self.num_data)
                msg["cond_indep_stack"] = frames[:i] + (renamed,) + frames[i + 1:]
                if full != self.num_data:
                    msg["scale"] = msg["scale"] * (self.num_data / full)
                return

    def _hand_rows(self, msg) -> None:
        own = msg["fn"]
        if own.subsample_size is not None and own.subsample_size != own.size:
            raise ValueError(
                f"the plate {self.name!r} subsamples itself (subsample_size="
                f"{own.subsample_size}): the library picks the rows of each "
                "call (fit's batch_size=; the estimators score every row they are given), "
                "so drop subsample_size= from the model and the guide"
            )
        if msg["value"] is None:
            msg["value"] = marked(self.idx)
        msg["name"] = DATA_PLATE
        msg["fn"] = _Subsample(self.num_data, len(self.idx))


@dataclass
class _Link:
    """Where Pyro keeps one parameter the program uses: the param store, a module, both."""

    tensor: Tensor
    store_name: str | None
    owner: nn.Module | None
    attribute: str | None

    def install(self, tensor: Tensor) -> None:
        if self.store_name is not None:
            pyro.get_param_store()._params[self.store_name] = tensor
        if self.owner is not None:
            self.owner._parameters[self.attribute] = tensor


class PyroProgram(nn.Module):
    """A Pyro program ``fn(x)`` in the engine's convention ``(x, idx, num_data)``.

    Parameters
    ----------
    fn : callable
        The user's model or guide; an ``nn.Module`` becomes a submodule (all its
        parameters are this program's).
    plate : str
        The name of its data plate.

    Parameters of Pyro's param store that ``fn`` uses (``pyro.param``, ``pyro.module``)
    are registered as this module's own (the same tensors, not copies), found by
    :meth:`found_params`.
    """

    def __init__(self, fn, plate: str):
        super().__init__()
        self.fn = fn
        self.plate = plate
        self._links: dict[str, _Link] = {}
        # A function written in the library's signature (x, idx=None, num_data=None) is
        # told its rows, as a module of the convention is.
        self._takes_rows = _takes_rows(fn)

    @property
    def program_name(self) -> str:
        """The user's name for the program, for messages."""
        return _shown(self.fn)

    def forward(self, x: Tensor, idx: Tensor | None = None, num_data: int | None = None):
        if idx is None:
            idx = torch.arange(len(x), device=x.device)
        num_data = num_data or len(x)
        with DataPlate(self.plate, num_data, idx), self._linked(), _quiet(), \
                _autoguide_plates(self.fn, self.plate, num_data, idx), _deterministic_hidden():
            if self._takes_rows:
                return self.fn(x, idx=idx, num_data=num_data)
            return self.fn(x)

    def found_params(self, x: Tensor, num_data: int | None = None) -> PyroProgram:
        """Register the parameters one trace of the program on ``x[:1]`` reads."""
        num_data = num_data or len(x)
        # The dataset's last row: a per-datapoint array must reach it.
        idx = torch.full((1,), num_data - 1, dtype=torch.long, device=x.device)
        try:
            with torch.no_grad(), pyro.validation_enabled(False), checked_indexing(num_data):
                trace = poutine.trace(self, param_only=True).get_trace(x[:1], idx, num_data)
        except PlateRowsError as error:  # without the trace shapes Pyro appends
            raise ValueError(f"{_shown(self.fn)}: {str(error).splitlines()[0]}") from None
        own = {id(p) for p in self.parameters()}
        roots = _roots(self.fn)
        for name, site in trace.nodes.items():
            leaf = _leaf(site["value"])
            if id(leaf) in own:
                continue
            own.add(id(leaf))
            key = _key(name)
            if key in self._parameters:
                raise ValueError(f"two parameters of {_shown(self.fn)} map to one name {key!r}")
            link = _link(name, leaf, roots)
            if _MODULE_DIVIDER in name and roots and link.owner is None:
                raise ValueError(_stale_module_message(name))
            self._parameters[key] = leaf  # the store's own tensor: trained in place
            self._links[key] = link
        return self

    @contextlib.contextmanager
    def _linked(self):
        # Normally each registered tensor is the one Pyro reads, and this does nothing.
        # When the loss is traced (TracedLoss), a traced input stands in for it, and
        # it must stand in where the program reads it too.
        changed = [(link, self._parameters[key]) for key, link in self._links.items()
                   if self._parameters[key] is not link.tensor]
        for link, tensor in changed:
            link.install(tensor)
        try:
            yield
        finally:
            for link, _ in changed:
                link.install(link.tensor)


def _parameters_of(function):
    """The parameters of ``function`` (None where Python cannot tell), looked up once per
    function (every bound method of one function has the same): ``inspect.signature``
    takes longer than a small model's call. The cache holds its functions weakly."""
    underlying = getattr(function, "__func__", None)
    cache = _SIGNATURES[underlying is not None]
    key = function if underlying is None else underlying
    try:
        return cache[key]
    except TypeError:  # a callable that cannot be weakly referenced or hashed
        return _signature_parameters(function)
    except KeyError:
        cache[key] = parameters = _signature_parameters(function)
        return parameters


# Signatures of functions called as they are (False) and as bound methods (True).
_SIGNATURES = {False: weakref.WeakKeyDictionary(), True: weakref.WeakKeyDictionary()}


def _signature_parameters(function):
    try:
        return inspect.signature(function).parameters
    except (TypeError, ValueError):
        return None


def required_guide(guide, hint: str = ""):
    """``guide``, refused when None: a call that needs one would otherwise fail deep
    inside Pyro's tracing. ``hint`` says what the caller may pass instead."""
    if guide is None:
        raise ValueError(
            "guide is None: this call needs a guide, a Pyro program that draws the model's "
            f"latents (an encoder, an autoguide, a guide function){hint}"
        )
    return guide


def _check_callable(program, role: str) -> None:
    if not callable(program):
        raise ValueError(f"{role} must be {_EXPECTED}; got {type(program).__name__}")
    function = program.forward if isinstance(program, nn.Module) else program
    parameters = _parameters_of(function)
    if parameters is None:
        return
    kinds = [p.kind for p in parameters.values()]
    takes_data = any(kind in (inspect.Parameter.POSITIONAL_ONLY,
                              inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              inspect.Parameter.VAR_POSITIONAL) for kind in kinds)
    if not takes_data:
        raise ValueError(
            f"{role} {_shown(program)} takes no data argument; it must be {_EXPECTED}"
        )


def _shown(program) -> str:
    return getattr(program, "__qualname__", None) or type(program).__name__


def _raw_trace(program, x: Tensor, role: str):
    """One trace of the user's program on all of ``x``, as the user would run it."""
    try:
        with torch.no_grad(), pyro.validation_enabled(False), _quiet():
            return poutine.trace(program).get_trace(x)
    except Exception as error:  # noqa: BLE001 - any failure of the user's code is reported
        raise ValueError(
            f"calling the {role} as {role}(x) on x of shape {tuple(x.shape)} failed with "
            f"{type(error).__name__}: {error}. A {role} that is not a PyroModule with "
            f"forward(x, idx=None, num_data=None) is called with the data alone{_hint(error)}"
        ) from error


def _hint(error: Exception) -> str:
    if "Shape mismatch inside plate" in str(error):
        return ("; every dim of one datapoint must be an event dim: declare them with "
                ".to_event(n), e.g. dist.Normal(loc, scale).to_event(1)")
    return ""


def is_deterministic(msg) -> bool:
    """A ``pyro.deterministic`` record: an observed, masked Delta that scores nothing."""
    return msg["type"] == "sample" and bool(msg["infer"].get("_deterministic"))


def _deterministic_hidden():
    """Hide a program's ``pyro.deterministic`` records from the engine: to Pyro they are
    observed sites, which the checks would refuse as data outside the plate. Innermost
    in forward, so no handler of the engine's sees them; the program still gets the value.
    A fresh handler per call: one instance cannot be entered twice (nested programs)."""
    return poutine.block(hide_fn=is_deterministic)


def _data_plate(trace, num_rows: int, wanted: str | None) -> str:
    """The plate around the observed sites whose size is the number of rows."""
    observed = [site for site in trace.nodes.values()
                if site["type"] == "sample" and site["is_observed"] and not is_deterministic(site)]
    if not observed:
        raise ValueError("the model has no observed sample site (obs=...): there is no data "
                         "to score")
    plates = {}
    for site in observed:
        for frame in site["cond_indep_stack"]:
            if frame.vectorized:
                plates[frame.name] = frame
    if wanted is not None:
        if wanted not in plates:
            raise ValueError(f"plate={wanted!r} is not a plate around the model's observed "
                             f"sites; found {sorted(plates)}")
        frame = plates[wanted]
    else:
        sized = [f for f in plates.values() if (f.full_size or f.size) == num_rows]
        if len(sized) != 1:
            found = {name: f.full_size or f.size for name, f in plates.items()}
            what = "no plate" if not sized else "several plates"
            raise ValueError(
                f"{what} around the model's observed sites has the data's {num_rows} rows "
                f"(plates found, with their sizes: {found}); pass plate=<name> to say "
                "which plate holds the datapoints"
            )
        frame = sized[0]
    if frame.dim != -1:
        raise ValueError(f"the data plate {frame.name!r} is at dim {frame.dim}; it must be at "
                         "dim -1 (the library draws its samples at dim -2)")
    return frame.name


def _check_observed(trace, plate: str) -> None:
    """Refuse data that an observed site gives no density (it would score nonsense)."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or not site["is_observed"] or is_deterministic(site):
            continue
        if plate not in {frame.name for frame in site["cond_indep_stack"]}:
            raise ValueError(f"observed site {name!r} is outside the data plate {plate!r}")
        inside = site["fn"].support.check(site["value"])
        if not bool(inside.all()):
            raise ValueError(
                f"x has values outside the support of the model's observed site {name!r} "
                f"({type(site['fn']).__name__}, support {site['fn'].support}); for example "
                "a Bernoulli likelihood needs data in {0, 1}"
            )


# How pyro.module names a network's parameters in the param store: "decoder$$$0.weight".
_MODULE_DIVIDER = "$$$"


def _stale_module_message(name: str) -> str:
    network = name.split(_MODULE_DIVIDER)[0]
    return (
        f"Pyro's param store already holds {name!r} from another network registered as "
        f"pyro.module({network!r}, ...): Pyro then reads that network's tensor, not this "
        "one's, so training would change numbers this model never uses. Call "
        "pyro.clear_param_store() before building a second model, or give the networks "
        "distinct names"
    )


def _leaf(value: Tensor) -> Tensor:
    """The unconstrained tensor behind a ``pyro.param`` value (itself when unconstrained)."""
    unconstrained = getattr(value, "unconstrained", None)
    leaf = unconstrained() if callable(unconstrained) else None
    return value if leaf is None else leaf


def _key(name: str) -> str:
    # nn.Module names may not hold "." (pyro.module names do: "decoder$$$fc.weight").
    return "pyro_param__" + name.replace(".", "__")


def _roots(fn) -> list[nn.Module]:
    """Modules the program may hold its networks in: its object, its closure, its globals."""
    roots = []
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        roots.append(owner)
    if isinstance(fn, nn.Module):
        roots.append(fn)
    function = getattr(fn, "__func__", fn)
    code = getattr(function, "__code__", None)
    if code is not None:
        cells = [c.cell_contents for c in (function.__closure__ or ()) if _filled(c)]
        names = [function.__globals__.get(n) for n in code.co_names]
        roots += [value for value in cells + names if isinstance(value, nn.Module)]
    return roots


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _link(name: str, leaf: Tensor, roots: list[nn.Module]) -> _Link:
    store = pyro.get_param_store()
    store_name = name if store._params.get(name) is leaf else None
    for root in roots:
        for module in root.modules():
            for attribute, tensor in module._parameters.items():
                if tensor is leaf:
                    return _Link(leaf, store_name, module, attribute)
    return _Link(leaf, store_name, None, None)


@contextlib.contextmanager
def _autoguide_plates(fn, plate: str, num_data: int, idx: Tensor):
    """An autoguide builds its plates from its prototype (a fixed subsample size, random
    rows); for the length of a call it gets the call's plate: the rows ``idx``."""
    if not isinstance(fn, AutoGuide):
        yield
        return
    previous = fn.create_plates
    fn.create_plates = lambda *args, **kwargs: pyro.plate(plate, num_data, subsample=idx, dim=-1)
    try:
        yield
    finally:
        fn.create_plates = previous


@contextlib.contextmanager
def _quiet():
    # pyro.module warns on every call about parameters that do not require grad, which
    # is how the library freezes a model while it fits a guide or runs AIS.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was not registered in the param store")
        yield

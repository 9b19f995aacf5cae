"""job.model_factory: find the job's function that builds its model, call it, check what it returns.

`FILE.py:FUNCTION` (relative to cluster.yaml's directory) or `package.module:FUNCTION`; it is
called with job.args and returns `(model, example_inputs)`. Every error is one line that names
job.model_factory.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from orchestrator.errors import OrchError, UsageError

FIELD = "job.model_factory"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


@dataclass(frozen=True)
class ModelFactory:
    spec: str  # as written in the config
    function: Callable[[list[str]], Any]
    args: tuple[str, ...]  # job.args

    def build(self) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        """A fresh model and the example inputs, as the job's function makes them."""
        try:
            built = self.function(list(self.args))
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the job's own code: any error, in one line
            raise OrchError(f"{FIELD}: {self.spec} raised {_first_line(exc)}") from None
        return self._checked(built)

    def _checked(self, built: Any) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        expected = "(model, example_inputs): an nn.Module and a tuple of tensors"
        if not isinstance(built, (tuple, list)) or len(built) != 2:
            raise OrchError(f"{FIELD}: {self.spec} must return {expected}; it returned {_kind(built)}")
        model, inputs = built
        if not isinstance(model, nn.Module):
            raise OrchError(f"{FIELD}: {self.spec} must return {expected}; its model is {_kind(model)}")
        if (
            not isinstance(inputs, (tuple, list))
            or not inputs
            or not all(isinstance(t, torch.Tensor) for t in inputs)
        ):
            raise OrchError(
                f"{FIELD}: {self.spec} must return {expected}; its example_inputs are {_kind(inputs)}"
            )
        return model, tuple(inputs)


def _kind(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(type(v).__name__ for v in value[:4])})"
    return f"a {type(value).__name__}"


def model_factory(config: Any, run_yaml: str) -> ModelFactory:
    """The config's model factory, resolved (its module imported). `run_yaml` names where the
    frozen config lives, for the message when the run was started without one."""
    spec = config.job.model_factory
    if not spec:
        raise UsageError(
            f"{FIELD} is not set in this run's config: set it (FILE.py:FUNCTION) in cluster.yaml,"
            f" or under job: in {run_yaml} to export a run started without it"
        )
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        module = _load_file(os.path.normpath(os.path.join(config.base_dir, target)), spec)
    else:
        module = _import_module(target, spec)
    function = getattr(module, name, None)
    if not callable(function):
        raise OrchError(f"{FIELD}: {spec}: {target} has no function {name!r}")
    return ModelFactory(spec=spec, function=function, args=tuple(config.job.args))


@contextlib.contextmanager
def _on_sys_path(folder: str) -> Iterator[None]:
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def _load_file(path: str, spec: str) -> Any:
    if not os.path.isfile(path):
        raise OrchError(f"{FIELD}: {spec}: {path} does not exist")
    # A name of its own: loading the job's script must not replace a module of that name, and
    # the module is registered so that what needs its classes by module name (pickling,
    # dataclasses, torch.export's source lookups) finds them.
    # Imported afresh on every call: an edited factory is what the next export uses.
    name = "_orch_model_factory_" + hashlib.sha256(path.encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise OrchError(f"{FIELD}: {spec}: {path} cannot be imported as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        # As when the script runs: its own folder first, so that it imports its siblings.
        with _on_sys_path(os.path.dirname(path)):
            module_spec.loader.exec_module(module)
    except SystemExit as exc:  # a training script that parses its command line on import
        sys.modules.pop(name, None)
        raise OrchError(
            f"{FIELD}: importing {path} exited ({exc.code}): does it train on import? Put that under"
            ' `if __name__ == "__main__":`'
        ) from None
    except Exception as exc:  # noqa: BLE001 - the job's own code: any error, in one line
        sys.modules.pop(name, None)
        raise OrchError(f"{FIELD}: importing {path} failed: {_first_line(exc)}") from None
    return module


def _import_module(target: str, spec: str) -> Any:
    try:
        # The working directory first, as for `python -m` (how job.module starts its ranks).
        with _on_sys_path(os.getcwd()):
            return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == target or target.startswith(exc.name + ".")):
            raise OrchError(f"{FIELD}: {spec}: no module named {exc.name!r}") from None
        raise OrchError(f"{FIELD}: importing {target} failed: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - the job's own code: any error, in one line
        raise OrchError(f"{FIELD}: importing {target} failed: {_first_line(exc)}") from None

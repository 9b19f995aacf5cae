"""The tree's rules, checked: no import cycles, each part imports only what docs/design.md's map
allows, the job-side runtime loads nothing of the controller, and the package list ships every
folder (templates included)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import typing

from orchestrator.backends import backend_names
from orchestrator.spec.config import ClusterConfig

from ..conftest import REPO

# What a training script must be able to import without: the controller's parts, and the
# libraries only the controller needs.
CONTROLLER = (
    "orchestrator.cli",
    "orchestrator.errors",
    "orchestrator.spec",
    "orchestrator.launch",
    "orchestrator.backends",
    "orchestrator.supervision",
    "orchestrator.storage.catalog",
    "yaml",
    "submitit",
)

BLOCKED_IMPORT = f"""
import importlib.abc, sys
BLOCKED = {CONTROLLER!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"the runtime imported controller module {{name}}")
sys.meta_path.insert(0, Block())
import orchestrator.runtime
from orchestrator.runtime import checkpoint, dist, errorfile, heartbeat, metrics, preemption, sampler
loaded = sorted(m for m in sys.modules if m.startswith("orchestrator"))
print(" ".join(loaded))
"""


def test_no_import_cycles_and_every_part_keeps_to_its_layer() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "import_graph.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_the_runtime_imports_nothing_of_the_controller() -> None:
    proc = subprocess.run([sys.executable, "-c", BLOCKED_IMPORT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = set(proc.stdout.split())
    assert "orchestrator.contract" in loaded and "orchestrator.runtime.checkpoint" in loaded
    assert {m.split(".")[1] for m in loaded if m.count(".")} <= {"contract", "runtime", "storage"}, loaded


def test_the_block_itself_works() -> None:
    # The check above is only worth something if the finder really refuses these modules.
    code = BLOCKED_IMPORT.replace("import orchestrator.runtime\n", "import orchestrator.spec.config\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "the runtime imported controller module orchestrator.spec" in proc.stderr


def test_the_wheel_lists_every_package_folder() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {
        ".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "orchestrator").rglob("__init__.py")
    }
    assert listed == folders | {"orchestrator.templates"}
    assert (REPO / "templates" / "slurm_node.sh").exists() and (REPO / "templates" / "slurm_task.sh").exists()


def test_every_backend_folder_is_a_config_choice() -> None:
    backend_field = typing.get_type_hints(ClusterConfig)["backend"]
    assert set(typing.get_args(backend_field)) == set(backend_names()) == {"local", "slurm"}

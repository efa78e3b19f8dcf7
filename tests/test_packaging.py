"""What the package promises about itself: one export list, one version, the core without
its extras (s3, gpu, ui), and ``longrun_dagster.gpu`` without Dagster."""

import ast
import importlib
import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import longrun_dagster

ROOT = Path(__file__).parent.parent

# Run first in a child interpreter: the named top-level packages cannot be imported there,
# as on a machine where they are not installed.
BLOCK = '''
import importlib.abc, sys
BLOCKED = {blocked!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named {{name!r}} (blocked by the test)")
        return None
sys.meta_path.insert(0, Blocker())
'''


def run_without(blocked: set[str], code: str, tmp_path: Path) -> str:
    source = BLOCK.format(blocked=sorted(blocked)) + textwrap.dedent(code)
    done = subprocess.run([sys.executable, "-c", source], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240, env={"PATH": "/usr/bin:/bin",
                                                       "HOME": str(tmp_path),
                                                       "DAGSTER_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_export_list_and_the_typing_imports_agree() -> None:
    tree = ast.parse((ROOT / "longrun_dagster" / "__init__.py").read_text())
    typed = {alias.asname or alias.name: node.module for node in ast.walk(tree)
             if isinstance(node, ast.ImportFrom) and node.module
             and node.module.startswith("longrun_dagster.") for alias in node.names}
    exports = longrun_dagster._EXPORTS
    assert typed == exports, "longrun_dagster/__init__.py: _EXPORTS and its TYPE_CHECKING " \
                             "imports list different names or modules"
    assert longrun_dagster.__all__ == sorted(exports)
    for name, module in exports.items():
        value = getattr(longrun_dagster, name)
        assert getattr(importlib.import_module(module), name) is value, name


def test_the_version_is_declared_once() -> None:
    assert importlib.metadata.version("longrun-dagster") == longrun_dagster.__version__
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()


def test_gpu_imports_without_dagster(tmp_path: Path) -> None:
    out = run_without({"dagster"}, """
        import longrun_dagster, longrun_dagster.gpu as gpu
        guard = gpu.VramGuard(gpu.HostMemoryBackend(), gpu.Thresholds())
        for _ in range(3):
            guard.step()
        print(type(guard).__name__, "dagster" in sys.modules)
    """, tmp_path)
    assert out.split() == ["VramGuard", "False"]


def test_the_core_runs_a_stage_without_its_extras(tmp_path: Path) -> None:
    """No dagster-aws, boto3, torch, NVML or webserver: a model stage commits and reuses on
    local storage; an s3:// store says which extra to install."""
    out = run_without({"dagster_aws", "boto3", "botocore", "torch", "pynvml",
                       "dagster_webserver"}, f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        import dagster as dg, pandas as pd, pandera.pandas as pa
        from longrun_dagster import (AtomicObjectStoreIOManager, ConfigError, GpuGuard,
                                     model_stage, open_store)

        @dg.asset
        def words() -> pd.DataFrame:
            return pd.DataFrame({{"id": ["a", "b", "c"]}})

        class Out(pa.DataFrameModel):
            id: str

        @model_stage(upstream=words, schema=Out, batch_size=2, hook_resource_keys=["gpu"])
        def copied(batch, stage):
            return batch[["id"]]

        resources = {{"io_manager": AtomicObjectStoreIOManager(base_uri=os.path.abspath("lr")),
                     "gpu": GpuGuard()}}
        assert dg.materialize([words, copied], resources=resources).success
        again = dg.materialize([words, copied], resources=resources, selection=[copied])
        [event] = again.get_asset_materialization_events()
        print("reused", event.materialization.metadata["reused"].value)
        print("s3 field", "s3" in AtomicObjectStoreIOManager.model_fields)
        try:
            open_store("s3://bucket/prefix")
        except ConfigError as exc:
            print("s3:", exc)
        print("blocked loaded", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
    """, tmp_path)
    lines = out.splitlines()
    assert "reused True" in lines and "s3 field False" in lines, out
    assert any(line.startswith("s3:") and "longrun-dagster[s3]" in line for line in lines), out
    assert "blocked loaded []" in lines, out

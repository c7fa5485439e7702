"""The installed package imports no plotting code.

matplotlib belongs to the paper reproduction (``paper/``) and the example scripts; a
user who imports ``skmsif`` or any of its submodules must not pay for it (or need it).
Checked in a fresh interpreter, where nothing else has imported matplotlib yet.
"""

import json
import subprocess
import sys

PROBE = r"""
import importlib, json, pkgutil, sys
import skmsif
names = ["skmsif"] + sorted(info.name for info in
                            pkgutil.walk_packages(skmsif.__path__, prefix="skmsif."))
report = {"modules": names, "plotting": None, "errors": {}}
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:
        report["errors"][name] = f"{type(exc).__name__}: {exc}"
    loaded = sorted(m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib."))
    if loaded and report["plotting"] is None:
        report["plotting"] = name
print(json.dumps(report))
"""


def test_no_submodule_imports_matplotlib():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "skmsif.datasets" in report["modules"] and "skmsif.turnover" in report["modules"]
    assert not report["errors"], f"submodules that failed to import: {report['errors']}"
    assert report["plotting"] is None, (
        f"importing {report['plotting']} imported matplotlib; plotting belongs in paper/ "
        "or examples/, not in the package")


def test_paper_is_not_part_of_the_package():
    """``setup.py`` ships ``skmsif`` only: the reproduction stays in the repository."""
    from pathlib import Path

    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert 'find_packages(include=["skmsif", "skmsif.*"])' in setup

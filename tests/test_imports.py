"""Every module imports on its own, as the first module of the package a process loads: an import circle
shows up only in the order that enters it from the wrong side (a test file that happened to import
`quant.awq` first failed in CI while the whole suite, importing `cli` first, passed). Checked in a child
process, so the suite's own imports are untouched."""

import json
import subprocess
import sys

CHILD = r"""
import importlib, json, pkgutil, sys
import minicpm_compress
names = sorted(m.name for m in pkgutil.walk_packages(minicpm_compress.__path__, "minicpm_compress."))
failures = {}
for name in names:
    for loaded in [m for m in sys.modules if m.startswith("minicpm_compress.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ImportError as e:
        failures[name] = str(e)
print(json.dumps({"modules": len(names), "failures": failures}))
"""


def test_every_module_imports_first():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["modules"] > 50 and result["failures"] == {}

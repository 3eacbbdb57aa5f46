"""The benchmark harness (bench/run.py) runs end to end in --quick mode.

It checks the harness, not the speed: every workload must produce a figure for mmkv and for
every peer that can run on this machine, and the table (and, with matplotlib, the chart) must
be written.  No timing is asserted.
"""
import importlib
import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "bench", "run.py")

# Which systems take part in each workload (kept here independently of bench/run.py on purpose).
EXPECTED = {
    "get": ["mmkv", "lmdb", "lmdb-reused-txn", "sqlite", "diskcache", "dict", "redis"],
    "get_absent": ["mmkv", "lmdb", "lmdb-reused-txn", "sqlite", "diskcache", "dict", "redis"],
    "put": ["mmkv", "lmdb", "sqlite", "diskcache", "dict", "redis"],
    "batch_put": ["mmkv", "lmdb", "sqlite", "diskcache", "dict", "redis"],
    "delete": ["mmkv", "lmdb", "sqlite", "diskcache", "dict", "redis"],
    "durable_put": ["mmkv", "lmdb", "sqlite"],
    "counter": ["mmkv", "lmdb", "sqlite", "diskcache", "mp.Value", "redis"],
    "open": ["mmkv", "lmdb", "sqlite"],
    "space": ["mmkv", "lmdb", "sqlite", "diskcache"],
    "scale": ["mmkv"],
    "compact": ["mmkv"],
}


def importable(name):
    try:
        importlib.import_module(name)
        return True
    except Exception:
        return False


def available():
    ok = {"mmkv", "sqlite", "dict", "mp.Value"}
    if importable("lmdb"):
        ok |= {"lmdb", "lmdb-reused-txn"}
    if importable("diskcache"):
        ok.add("diskcache")
    if importable("redis") and shutil.which("redis-server"):
        ok.add("redis")
    return ok


def test_quick_run_covers_every_workload_and_peer(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, RUN, "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    doc = json.loads((out / "results-quick.json").read_text())
    assert doc["config"]["quick"] is True
    for key in ("cpu", "cores", "python", "filesystem"):
        assert doc["machine"][key], key
    avail = available()
    for workload, systems in EXPECTED.items():
        assert workload in doc["workloads"], f"no results for {workload}"
        metrics = doc["workloads"][workload]["metrics"]
        assert metrics, workload
        for m in metrics:      # mmkv has every figure
            v = m["values"].get("mmkv")
            assert v and isinstance(v["median"], (int, float)) and v["median"] > 0, (workload, m["id"])
        for system in systems:
            if system not in avail:
                continue
            figures = [m["values"][system]["median"] for m in metrics
                       if m["values"].get(system) and m["values"][system]["median"] is not None]
            assert figures and all(f > 0 for f in figures), f"no figure for {system} in {workload}"
            if system != "mmkv":
                assert any(system in m["ratios"] for m in metrics), f"no ratio for {system} in {workload}"
    assert not [f for f in doc["failures"] if f["system"] in ("mmkv", "harness")], doc["failures"]

    table = (out / "results-quick.md").read_text()
    header = [line for line in table.splitlines() if line.startswith("| workload |")]
    assert header and "| mmkv |" in header[0]
    for workload in EXPECTED:
        assert f"| {workload} |" in table, workload
    if importable("matplotlib"):
        chart = out / "ratios-quick.png"
        assert chart.exists() and chart.stat().st_size > 0
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert doc["chart"] is None and "matplotlib" in doc["chart_note"]

"""`bench/gpu_session.sh` runs once per GPU session, in a few minutes of device time that a typo
would waste: check here, on the CPU, that every command it runs accepts its flags and names
files that exist, and that its parts fit in one device call."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_session.sh"
DEVICE_CALL_LIMIT_S = 600       # the most one command may run on the lent machine


def parts():
    """[(limit seconds, name, argv after the interpreter)] of the script's `part` lines."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        if not line.startswith("part "):
            continue
        words = shlex.split(line.replace('"${PARALLEL[@]}"', ""))
        limit, name, python, *argv = words[1:]
        assert python == "$PY", f"part {name} does not run $PY: {line}"
        found.append((int(limit), name, argv))
    return found


def test_parts_fit_in_one_device_call():
    found = parts()
    assert [name for _, name, _ in found] == ["tests", "train_step", "kernels", "vs_timm"]
    # leave at least 10 s for nvidia-smi, the version line and copying the results
    assert sum(limit for limit, _, _ in found) <= DEVICE_CALL_LIMIT_S - 10


def test_pytest_part_names_existing_test_files():
    (_, _, argv), = [p for p in parts() if p[1] == "tests"]
    assert argv[:2] == ["-m", "pytest"]
    files = [a for a in argv if a.endswith(".py")]
    assert len(files) >= 5
    for f in files:
        assert (ROOT / f).is_file(), f"{SCRIPT.name} names {f}, which does not exist"


def test_benchmark_parts_accept_their_flags():
    """Each benchmark parses its flags before it looks for a GPU (or timm): on the CPU it must
    stop at that check (exit 1 with its message), never at argparse's usage error (exit 2)."""
    benchmarks = [p for p in parts() if p[2][0].startswith("bench/")]
    assert len(benchmarks) == 3
    env = dict(os.environ, OUT="/nonexistent-out", CUDA_VISIBLE_DEVICES="")
    for _, name, argv in benchmarks:
        argv = [a.replace("$OUT", env["OUT"]) for a in argv]
        result = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 1, (name, result.returncode, result.stderr[-2000:])
        assert re.search(r"no CUDA device|timm is not installed", result.stderr), \
            (name, result.stderr[-2000:])


def test_a_bad_flag_would_be_caught():
    """The check above can fail: an unknown flag stops a benchmark with exit 2."""
    result = subprocess.run([sys.executable, "bench/kernels.py", "--no-such-flag"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr


def test_docs_are_kept_when_the_call_is_cut_short(tmp_path):
    """The rewritten docs/benchmarks.md and docs/kernels.md go to $OUT after every part, not only
    at the end: a device call stopped during a later part (here: the script killed while the
    kernels part runs, every command a stand-in for python) still brings back the tables the
    earlier parts wrote."""
    stub = tmp_path / "python"
    stub.write_text("#!/bin/sh\ncase \"$*\" in *bench/kernels.py*) sleep 8;; esac\nexit 0\n")
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=str(stub))
    with open(tmp_path / "session.log", "w") as log:
        subprocess.run(["timeout", "3", "bash", str(SCRIPT)], cwd=ROOT, env=env, stdout=log,
                       stderr=subprocess.STDOUT, timeout=60)
    assert (out / "train_step.log").exists() and not (out / "vs_timm.log").exists()
    for doc in ("benchmarks.md", "kernels.md"):
        assert (out / doc).read_text() == (ROOT / "docs" / doc).read_text(), doc

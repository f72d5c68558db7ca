"""The GPU entry point cannot rot: its dry run works on a CPU, resumes part by part, and every command it
would run on the GPU parses (the expensive parts' commands are run for real by the harness tests in
test_kernels and test_experiments at the same --quick sizes)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from gqa.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def entry_point():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", ROOT / "scripts" / "gpu_acceptance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_each_part_and_resumes(tmp_path):
    argv = [sys.executable, "scripts/gpu_acceptance.py", "--dry-run", "--out", str(tmp_path),
            "--parts", "versions,kernels,decode,capacity"]
    first = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    for part in ("versions", "kernels", "decode", "capacity"):
        record = json.loads((tmp_path / part / "part.json").read_text())
        assert record["ok"] and record["dry_run"] and record["commands"][0]["exit_code"] == 0
    assert (tmp_path / "decode" / "bench_decode.json").is_file()
    assert (tmp_path / "capacity" / "bench_capacity.json").is_file()
    readme = (tmp_path / "README.md").read_text()
    assert "| [decode](decode/) | ok (dry run) |" in readme and "| paper | not yet |" in readme
    again = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.count("done before; skipped") == 4
    # a part done by other code (or as a dry run, when the real one is asked for) is not taken as done
    record = json.loads((tmp_path / "versions" / "part.json").read_text())
    (tmp_path / "versions" / "part.json").write_text(json.dumps({**record, "code": "other"}))
    redo = subprocess.run([*argv[:-1], "versions"], cwd=ROOT, capture_output=True, text=True)
    assert redo.returncode == 0 and "[versions] done before by other code; running it again" in redo.stdout
    assert json.loads((tmp_path / "versions" / "part.json").read_text())["code"] == record["code"]


def test_unknown_part_is_refused(tmp_path):
    result = subprocess.run([sys.executable, "scripts/gpu_acceptance.py", "--out", str(tmp_path), "--parts", "dcode"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "unknown parts ['dcode']" in result.stderr
    assert not any(tmp_path.iterdir())


def test_every_gpu_command_parses(tmp_path):
    module = entry_point()
    for dry in (False, True):
        for part, commands in module.parts(tmp_path, dry).items():
            for command in commands:
                if command[1:3] == ["-m", "gqa"]:
                    build_parser().parse_args(command[3:])  # raises on a flag that no longer exists
                elif command[1].endswith(".py"):
                    assert (ROOT / command[1]).is_file(), (part, command)

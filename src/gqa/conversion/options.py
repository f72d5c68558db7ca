"""Every option of one conversion, in one frozen object that both model shapes read: `gqa convert` builds it
from its flags, `gqa.convert()` from its keyword arguments. It answers the questions the options raise
(which method, does it read calibration text, which text, the training stages' settings) and refuses
combinations where an option would do nothing (it would be recorded as applied).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from ..errors import GQAError
from .interface import CALIB_DATA, CALIB_TOKENS, CalibrationSettings, Method
from .joint import JointSettings
from .methods import calibrated, get, owners
from .transfer import TransferSettings


@dataclass(frozen=True, kw_only=True)
class ConversionOptions:
    """Exactly one of n_kv_heads (every layer), n_kv_heads_per_layer, kv_budget (a fraction of the source's KV
    bytes, split over layers by measured sensitivity) sets the target. `method` is a registered method
    (`methods.REGISTRY`), `method_options` its own settings (aligned: `grouping`). `calib` (a file, folder or
    bundled corpus name; default the `general` mix where one is needed) is the text calibrated methods, the
    transfer, the joint stage and the budget read, `calib_tokens` of it (65,536 unless given). Options left
    None take their defaults. `encoder`: an encoder–decoder's encoder is grouped too."""
    n_kv_heads: int | None = None
    n_kv_heads_per_layer: list[int] | None = None
    kv_budget: float | None = None
    method: str = "mean"
    seed: int = 0
    calib: str | os.PathLike | None = None
    calib_tokens: int | None = None
    calib_seq_len: int | None = None
    transfer_steps: int = 0
    transfer_lr: float | None = None
    transfer_inputs: str | None = None
    joint_steps: int = 0
    joint_lr: float | None = None
    encoder: bool = False
    format: str = "auto"
    overwrite: bool = False
    progress: bool = True
    method_options: dict = field(default_factory=dict)

    @classmethod
    def of(cls, **keywords) -> ConversionOptions:
        """Options from keyword arguments; those that are not fields are the method's own settings."""
        names = {f.name for f in dataclasses.fields(cls)} - {"method_options"}
        return cls(**{k: v for k, v in keywords.items() if k in names},
                   method_options={k: v for k, v in keywords.items() if k not in names})

    @property
    def chosen(self) -> Method:
        return get(self.method)

    def settings(self):
        """The method's own settings dataclass, built from `method_options` (refusing another method's)."""
        return self.chosen.make_settings(self.method_options, owners)

    @property
    def tokens(self) -> int:
        return CALIB_TOKENS if self.calib_tokens is None else self.calib_tokens

    def reads_calibration(self) -> bool:
        """Whether the conversion reads calibration text (`calib`, or the default mix)."""
        return self.chosen.calibrated or self.transfer_steps > 0 or self.joint_steps > 0 or self.kv_budget is not None

    def calibration_for(self, config) -> CalibrationSettings | None:
        """The calibration a conversion of a model of `config` reads (None where nothing does), its block length
        checked against what the model's kind needs (`kinds.ModelKind.calibration_seq_len`)."""
        from ..kinds import kind_of

        calib = self.calibration_source()
        if calib is None:
            return None
        calibration = CalibrationSettings(calib, self.tokens, kind_of(config).calibration_seq_len(config,
                                                                                                  self.calib_seq_len))
        calibration.check()
        return calibration

    def calibration_source(self) -> str | None:
        """The calibration text to read: the one given (checked), the default mix where the conversion reads
        text and none was given; None where nothing reads it."""
        if self.calib:
            from ..data import check_source

            check_source(self.calib)
            return str(self.calib)
        return CALIB_DATA if self.reads_calibration() else None

    def training(self) -> tuple[TransferSettings, JointSettings]:
        """The transfer's and the joint stage's settings, defaults where an option was not given; checked."""
        transfer = TransferSettings(steps=self.transfer_steps, inputs=self.transfer_inputs or "original", seed=self.seed,
                                    lr=TransferSettings.lr if self.transfer_lr is None else self.transfer_lr)
        joint = JointSettings(steps=self.joint_steps, lr=JointSettings.lr if self.joint_lr is None else self.joint_lr,
                              seed=self.seed)
        transfer.check()
        joint.check()
        return transfer, joint

    def check(self) -> None:
        """Refuse an option that would do nothing in the combination given."""
        uses_calibration, method = self.reads_calibration(), self.chosen
        if self.calib and not uses_calibration:
            fitted = " / ".join(f"--method {m}" for m in calibrated())
            raise GQAError(f"--calib is read only by {fitted}, --transfer-steps, --joint-steps or --kv-budget; "
                           f"--method {method.name} merges from the weights alone: drop --calib or add one of them")
        for name, value in (("--calib-tokens", self.calib_tokens), ("--calib-seq-len", self.calib_seq_len)):
            if value is not None and not uses_calibration:
                raise GQAError(f"{name} sets the calibration, which --method {method.name} without --transfer-steps, "
                               f"--joint-steps or --kv-budget does not read")
        for name, value in (("--transfer-lr", self.transfer_lr), ("--transfer-inputs", self.transfer_inputs)):
            if value is not None and not self.transfer_steps:
                raise GQAError(f"{name} sets the layer-wise transfer, which runs only with --transfer-steps N (N > 0)")
        if self.joint_lr is not None and not self.joint_steps:
            raise GQAError("--joint-lr sets the joint stage, which runs only with --joint-steps N (N > 0)")


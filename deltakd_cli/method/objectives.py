"""The training objectives, each one component: its settings, its target, its divergence, its
default tail estimator, and how tables and model cards name it. This registry is the one source
for the choices of `distill --objective`, the options each objective reads, the resume checks,
the model card and the pipeline's students.

No torch here (the CLI shows its help from this module): an objective names its divergence, a
pure function in divergences.py, as "divergences.<function>", or holds the function itself (an
objective registered from outside the package). Every divergence has one signature,

    divergence(view: TargetView, student: StudentView, settings) -> [N]

over the target view that view.py builds from the cache, the live base student (if any) and the
tail estimator; `target(settings)` says which target (a `spec.TargetSpec`: points of the
KD-to-Delta family) the view holds, and `settings` is an instance of the objective's own settings
class below (a frozen dataclass whose fields are declared with `opt()`, so `distill` gets one
flag per field, with its help, checks, record and config key).

Adding an objective: its divergence (for a new per-token divergence, a `*_terms` function and a
two-line divergence in divergences.py), and one `register(Objective(...))` below (a new setting:
one field on a settings class here). An option given to an objective that does not read it is
refused in one line naming the objectives that do."""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deltakd_cli.errors import DeltakdError
from deltakd_cli.method.spec import TUNED_TEACHER, TargetSpec
from deltakd_cli.options import flag, opt

PANEL = "Objective"

# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class NoSettings:
    """An objective that reads no setting of its own."""


@dataclass(frozen=True, kw_only=True)
class ShiftSettings:
    """The Delta target's scale: p* = softmax(l0 + alpha * (lT - lB))."""

    alpha: float = opt(
        1.0, help="Scale of the teachers' shift in the delta target.", finite=True, panel=PANEL
    )


@dataclass(frozen=True, kw_only=True)
class MixSettings(ShiftSettings):
    mix: float = opt(
        0.5,
        help="Weight of the delta target vs the teacher.",
        at_least=0,
        at_most=1,
        panel=PANEL,
    )


@dataclass(frozen=True, kw_only=True)
class FamilySettings(ShiftSettings):
    gamma: float = opt(
        1.0,
        help="0 is KD to the tuned teacher, 1 is Delta-KD, between: the geometric mix of the two "
        "targets.",
        at_least=0,
        at_most=1,
        panel=PANEL,
    )


@dataclass(frozen=True, kw_only=True)
class JsdSettings:
    beta: float = opt(
        0.5,
        help="The generalised Jensen-Shannon divergence's beta (TRL's convention): 0 is the "
        "forward KL to the tuned teacher, 1 the reverse KL.",
        at_least=0,
        at_most=1,
        panel=PANEL,
    )


@dataclass(frozen=True, kw_only=True)
class SkewSettings:
    skew: float = opt(
        0.1,
        help="The teacher's share lambda in KL(pT || lambda pT + (1 - lambda) p_theta).",
        at_least=0,
        below=1,
        panel=PANEL,
    )


# ----------------------------------------------------------------------------- the component


def _tuned_teacher(settings: Any) -> TargetSpec:
    return TUNED_TEACHER


@dataclass(frozen=True)
class Objective:
    """One training objective.

    `divergence`: "divergences.<function>" or the function itself; None for cross-entropy only
    (sft). `target`: its settings -> the target the divergence is taken to (default: the tuned
    teacher). `default_tail`: the tail estimator it trains with when the cache has draws and
    `--tail` is not given, chosen by measurement (docs/method.md, "Which tail for which
    objective"); a cache without draws always trains the bucket."""

    name: str
    label: str  # a student trained with it, as tables name it
    description: str  # what it is, in one phrase (the model card)
    settings: type = NoSettings
    divergence: str | Callable[..., Any] | None = None
    target: Callable[[Any], TargetSpec] = _tuned_teacher
    needs_student: bool = False  # its target is built from S0 (cached log-probs or a frozen copy)
    takes_temperature: bool = True
    default_tail: str = "sampled"
    tags: tuple[str, ...] = ()  # model card tags besides deltakd and knowledge-distillation

    @property
    def needs_cache(self) -> bool:
        return self.divergence is not None

    @property
    def reads(self) -> tuple[str, ...]:
        """The names of the settings it reads (its settings class's fields)."""
        return tuple(field.name for field in dataclasses.fields(self.settings))

    def settings_from(self, values: Any) -> Any:
        """Its settings, from an object (options) or a dict holding at least the fields it
        reads."""
        get = values.get if isinstance(values, dict) else lambda name: getattr(values, name)
        return self.settings(**{name: get(name) for name in self.reads})

    def divergence_function(self) -> Callable[..., Any] | None:
        if self.divergence is None or callable(self.divergence):
            return self.divergence
        module, _, name = self.divergence.rpartition(".")
        return getattr(importlib.import_module(f"deltakd_cli.method.{module}"), name)


OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    """Add an objective to the registry (its name must be new; its settings' fields must not
    redeclare another objective's setting of the same name differently)."""
    if objective.name in OBJECTIVES:
        raise ValueError(f"objective {objective.name!r} is already registered")
    declared = setting_fields()
    for field in dataclasses.fields(objective.settings):
        other = declared.get(field.name)
        if other is not None and (other.default, other.metadata) != (field.default, field.metadata):
            raise ValueError(f"setting {field.name!r} is declared twice, differently")
    OBJECTIVES[objective.name] = objective
    return objective


def objective_names() -> tuple[str, ...]:
    return tuple(OBJECTIVES)


def get(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise DeltakdError(f"unknown objective {name!r}; choose one of {objective_names()}")
    return OBJECTIVES[name]


def setting_fields() -> dict[str, dataclasses.Field]:
    """Every objective's settings, by name (each declared once)."""
    fields: dict[str, dataclasses.Field] = {}
    for objective in OBJECTIVES.values():
        for field in dataclasses.fields(objective.settings):
            fields.setdefault(field.name, field)
    return fields


def setting_defaults() -> dict[str, Any]:
    return {name: field.default for name, field in setting_fields().items()}


def setting_values(options: Any) -> dict[str, Any]:
    """Every setting's value in `options` (its default where `options` has no such field: a
    finetune run reads none)."""
    return {name: getattr(options, name, field.default) for name, field in setting_fields().items()}


def readers_of(setting: str) -> list[str]:
    return [o.name for o in OBJECTIVES.values() if setting in o.reads]


def refuse_unread(objective: Objective, values: dict[str, Any]) -> None:
    """One line when a setting the objective does not read was given a value other than its
    default (an option that would pass unremarked)."""
    defaults = setting_defaults()
    for name, value in values.items():
        if name in defaults and name not in objective.reads and value != defaults[name]:
            readers = ", ".join(readers_of(name))
            raise DeltakdError(
                f"--objective {objective.name} does not read {flag(name)} (read by: {readers}); "
                f"drop {flag(name)} or choose one of those objectives"
            )


def options_class(name: str = "ObjectiveOptions") -> type:
    """A (mutable, keyword-only) dataclass holding every registered objective's settings as
    options: a command that trains with any objective inherits it. Built from the registry, so a
    new setting is a flag without another declaration."""
    fields = []
    for field in setting_fields().values():
        owner = next(o.settings for o in OBJECTIVES.values() if field.name in o.reads)
        hint = typing.get_type_hints(owner)[field.name]
        # the help says which objectives read the setting (from the registry, never by hand)
        metadata = {
            **field.metadata,
            "help": f"{field.metadata['help']} Read by: {', '.join(readers_of(field.name))}.",
        }
        fields.append(
            (field.name, hint, dataclasses.field(default=field.default, metadata=metadata))
        )
    cls = dataclasses.make_dataclass(name, fields, kw_only=True)
    cls.__module__ = __name__
    cls.__doc__ = "Every objective's settings (objectives.py), as options."
    return cls


# ----------------------------------------------------------------------------- the registry

# The default tail estimators, chosen by measurement (docs/method.md, "Which cache and tail for
# which objective"; bench/trl_paired.py, bench/delta_tails.py, bench/tail_fidelity.py): the
# draws' lack of bias pays in what training reaches. KD from the draws is within 0.01 nats/token
# of TRL's online KD; Delta-KD students from the corrected tail end 0.049 nats/token closer to
# their own target than from top-64 + bucket (3 seeds), though one cache's draws are noisy at S0
# (its per-position gradient cosine is the bucket's strength; training averages the noise).
KD_DEFAULT_TAIL = "sampled"
DELTA_DEFAULT_TAIL = "corrected"


def _delta(settings: Any) -> TargetSpec:
    return TargetSpec(((1.0, 1.0),), settings.alpha)


def _family_point(settings: Any) -> TargetSpec:
    return TargetSpec(((1.0, settings.gamma),), settings.alpha)


def _delta_and_teacher(settings: Any) -> TargetSpec:
    return TargetSpec(((settings.mix, 1.0), (1.0 - settings.mix, 0.0)), settings.alpha)


register(
    Objective(
        "sft",
        "SFT student",
        "supervised fine-tuning (cross-entropy on the reference responses)",
    )
)
register(
    Objective(
        "kd",
        "KD student",
        "token-level KD (forward KL to the tuned teacher)",
        divergence="divergences.forward_kl",
        default_tail=KD_DEFAULT_TAIL,
    )
)
register(
    Objective(
        "delta",
        "Delta-KD student",
        "Delta-KD (forward KL to the base student shifted by tuned - base teacher)",
        ShiftSettings,
        divergence="divergences.forward_kl",
        target=_delta,
        needs_student=True,
        default_tail=DELTA_DEFAULT_TAIL,
        tags=("delta-kd",),
    )
)
register(
    Objective(
        "delta-mse",
        "Delta-MSE student",
        "Delta-MSE (squared error between the student's own shift from S0 and the teachers' "
        "shift, at the kept ids)",
        ShiftSettings,
        divergence="divergences.shift_mse",
        target=_delta,
        needs_student=True,
        takes_temperature=False,
        default_tail="bucket",  # it reads the kept ids only
        tags=("delta-kd",),
    )
)
register(
    Objective(
        "delta-mix",
        "Delta-mix student",
        "Delta-mix (forward KL to a mixture of the Delta target and the tuned teacher)",
        MixSettings,
        divergence="divergences.forward_kl",
        target=_delta_and_teacher,
        needs_student=True,
        default_tail=DELTA_DEFAULT_TAIL,
        tags=("delta-kd",),
    )
)
register(
    Objective(
        "kd-to-delta",
        "KD-to-Delta student",
        "KD-to-Delta (forward KL to the geometric path from the tuned teacher, gamma 0, to the "
        "Delta target, gamma 1)",
        FamilySettings,
        divergence="divergences.forward_kl",
        target=_family_point,
        needs_student=True,
        default_tail=DELTA_DEFAULT_TAIL,
        tags=("delta-kd",),
    )
)
register(
    Objective(
        "reverse-kl",
        "Reverse-KL student",
        "reverse KL (KL(p_theta || pT) to the tuned teacher, mode-seeking)",
        divergence="divergences.reverse_kl",
        default_tail=KD_DEFAULT_TAIL,
    )
)
register(
    Objective(
        "gjsd",
        "GJSD student",
        "generalised Jensen-Shannon divergence to the tuned teacher (TRL's GKD convention)",
        JsdSettings,
        divergence="divergences.gjsd",
        default_tail=KD_DEFAULT_TAIL,
    )
)
register(
    Objective(
        "skew-kl",
        "Skew-KL student",
        "skew KL (KL(pT || lambda pT + (1 - lambda) p_theta) to the tuned teacher)",
        SkewSettings,
        divergence="divergences.skew_kl",
        default_tail=KD_DEFAULT_TAIL,
    )
)
register(
    Objective(
        "tv",
        "TV student",
        "total variation distance to the tuned teacher",
        divergence="divergences.total_variation",
        default_tail=KD_DEFAULT_TAIL,
    )
)

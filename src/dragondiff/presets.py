"""Step schedules as data: which sampling steps are guided, repeated (time travel) or stochastic (regional SDE).

`paper`    DragonDiffusion as published (official code with alg='D'): guidance at every step i < 30, single pass,
           no regional SDE, no image prompt.
`official` what the official demo runs (alg='D+', DiffEditor schedule): guidance at every step i < 10, then at
           even steps up to 28; steps 22, 24, 26, 28 run three times with time travel; regional SDE at 11..19.
           With an IP-Adapter loaded, the image prompt as the demo: the working image's tokens after the text,
           their term weighted by ip_scale at steps 10..19 only.
`fast`     ours, not the official code's: 20 sampling steps (and a 20-step inversion), one guided pass at every
           step below grid step 40 (16 of the 20), no time travel, the gradient ×1.5 (fewer guided steps need more
           per step), regional SDE on the same window. About 0.46× `official`'s time on the CPU; chosen and
           validated on the shapes benchmark (docs/speed.md). The image prompt as `official` when one is loaded.

Windows are given on the 50-step grid; with fewer steps, step i sits at grid step i * 50 // steps.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    guidance_until: int = 30  # guidance only at steps i < guidance_until
    every_step_until: int | None = None  # None: every step guided; else every step below it, then even steps
    time_travel_repeats: int = 1  # passes per time-travel step (3 in D+)
    time_travel_after: int = 20  # time travel at even steps i with time_travel_after < i < guidance_until
    sde_window: tuple[int, int] | None = None  # inclusive (first, last) steps with regional SDE
    sde_strength: float = 0.0  # default "flexibility strength" (eta inside the edit region)
    steps: int = 50  # sampling (and inversion) steps when the caller gives none
    guidance_gain: float = 1.0  # multiplies the energy gradient (fewer guided steps need more per step)
    image_prompt: bool = False  # use the image prompt when an IP-Adapter is loaded (the spec may say otherwise)
    ip_window: tuple[int, int] = (10, 19)  # inclusive steps where the image-prompt term acts (official: 10..19)

    def is_guided(self, i: int) -> bool:
        if i >= self.guidance_until:
            return False
        return self.every_step_until is None or i < self.every_step_until or i % 2 == 0

    def repeats(self, i: int) -> int:
        if self.time_travel_repeats > 1 and self.is_guided(i) and self.time_travel_after < i and i % 2 == 0:
            return self.time_travel_repeats
        return 1

    def ip_active(self, i: int) -> bool:
        return self.ip_window[0] <= i <= self.ip_window[1]

    def has_sde(self, i: int) -> bool:
        return self.sde_window is not None and self.sde_window[0] <= i <= self.sde_window[1]


PAPER = Preset(name="paper")
OFFICIAL = Preset(
    name="official",
    every_step_until=10,
    time_travel_repeats=3,
    sde_window=(11, 19),
    sde_strength=0.4,
    image_prompt=True,
)
FAST = Preset(
    name="fast",
    guidance_until=40,
    sde_window=(11, 19),
    sde_strength=0.4,
    steps=20,
    guidance_gain=1.5,
    image_prompt=True,
)
PRESETS = {p.name: p for p in (PAPER, OFFICIAL, FAST)}


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} (or a Preset), got {preset!r}")
    return PRESETS[preset]

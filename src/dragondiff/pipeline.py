"""`DragonPipeline`: load a Stable Diffusion model (SD1.x, SD2.x, SDXL) once, then edit images with one method per task.

    pipe = DragonPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    out = pipe.move("cup.png", "cup_mask.png", offset=(120, 0), prompt="a photo of a cup")
    out.image.save("moved.png")

Each edit reads top to bottom like the algorithm: prepare inputs -> DDIM inversion with memory-bank capture ->
task-specific z_T -> guided sampling -> decode. Edits are serialised per UNet (its attention processors are
swapped for the duration of an edit); all per-edit state lives inside the call.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import loading
from .attention import PLAIN, REPLACE, BankController, MemoryBank
from .compile import CompileSettings, cache_hits, compile_unet, explain_failure, graphs_built, uncompile_unet
from .errors import PerformanceNote
from .inputs import Prepared, load_image, to_pixels
from .inversion import Inversion, merge_banks
from .limits import BUNDLED_RESOLUTION, DEFAULT_PRESET, check
from .loading import BUNDLED_ID, DEFAULT_MODEL, default_device
from .planning import Plan, plan_edit, planned_for
from .presets import Preset, get_preset
from .result import EditResult
from .sampler import (EditState, Guidance, PassCounts, Problem, StepInfo, Stopwatch, invert, sample,
                      sample_text_to_image)
from .spec import COMMON_FIELDS, EditSpec
from .steps import RULES, Schedule
from .tasks import TASKS
from .tasks.base import Task
from .tasks.drag import DragParams
from .tasks.move import MoveParams
from .tasks.params import TEXT, check_value
from .tasks.paste import PasteParams
from .validate import check_device, check_dtype, check_int, check_string

# The official demo's energy slider shows s / 1000: the energy scale of a spec is in those units.
ENERGY_UNIT = 1000.0
# The official demo's CFG scale and energy scale (slider units) per task, from the task registry: what an edit uses
# when neither the caller nor the model's recommended settings give a value. Chosen upstream for SD1.5 at 512 px.
OFFICIAL_SETTINGS = {name: {k: info.settings[k] for k in ("guidance_scale", "energy_scale")}
                     for name, info in TASKS.items()}


class DragonPipeline:
    """DragonDiffusion on a backbone (SD1.x, SD2.x or SDXL: stock diffusers UNet2DConditionModel, AutoencoderKL,
    CLIP text encoders; `loading.BACKBONES`). Load once, edit many: `edit(spec)` runs any task; `move`, `drag`,
    `replace_appearance`, `paste` and `reshape_face` are its typed wrappers. Edits on one backbone are serialised by its lock."""

    def __init__(self, unet=None, vae=None, text_encoder=None, tokenizer=None, scheduler=None, *,
                 text_encoder_2=None, tokenizer_2=None, transformer=None, text_encoder_3=None, tokenizer_3=None,
                 backbone=None, device=None, dtype=None, recommended_settings: dict | None = None,
                 default_max_resolution: int | None = None):
        """Either the components (a unet or a transformer, vae, text_encoder, tokenizer, and the second and third
        text encoders and tokenizers of SDXL, SD3 and FLUX; the backbone class is picked from the denoiser's
        configuration) or a ready `backbone`, and the scheduler whose configuration the step rule reads (DDIM's ᾱ
        table and prediction type, or flow matching's σ and shift). `recommended_settings` ({task: {...}}) and
        `default_max_resolution` override the backbone's defaults (`loading.BACKBONE_DEFAULTS`)."""
        if scheduler is None:
            raise TypeError("DragonPipeline needs a scheduler (its ᾱ table or σ schedule and timesteps)")
        scheduler_config = {**scheduler.config, "_class_name": type(scheduler).__name__}
        components = (unet, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3,
                      tokenizer_3)
        if backbone is None:
            if (unet is None) == (transformer is None):
                raise TypeError("DragonPipeline needs a backbone or its components (a unet or a transformer, vae, "
                                "text_encoder, tokenizer)")
            denoiser = unet if unet is not None else transformer
            cls = loading.backbone_class(denoiser.config, scheduler_config)
            third = {} if text_encoder_3 is None and tokenizer_3 is None else {"text_encoder_3": text_encoder_3,
                                                                               "tokenizer_3": tokenizer_3}
            backbone = cls.from_components(denoiser, vae, text_encoder, tokenizer, text_encoder_2=text_encoder_2,
                                           tokenizer_2=tokenizer_2, **third)
        elif any(c is not None for c in components):
            raise TypeError("DragonPipeline: pass a backbone or its components, not both")
        loading.check_scheduler(type(backbone), scheduler_config)
        self.backbone = backbone
        own = {"settings": loading.check_settings(recommended_settings or {}, "recommended_settings")}
        if default_max_resolution is not None:
            own["max_resolution"] = check("max_resolution", default_max_resolution, "default_max_resolution")
        defaults = loading.model_defaults(backbone.NAME, own)
        self.recommended_settings = defaults["settings"]
        # Where the weights came from (set by the loaders; None for components built in memory), for provenance.
        self.model_id: str | None = None
        self.model_path: Path | None = None
        # The working resolution an edit uses when neither the spec nor an Inversion gives one (the official 768,
        # SDXL's 1024; the bundled model's 128, the size it was trained at).
        self.default_max_resolution = defaults["max_resolution"]
        # Both energy gradients through one batched backward (same numbers as the official two; see
        # sampler.guidance). None = on CUDA only: on the CPU the batched backward measured 9 % slower (docs/speed.md).
        self.one_backward: bool | None = None
        # Exact per-phase seconds on CUDA (EditResult.phases): synchronises at every phase boundary; benchmarks only.
        self.precise_timings = False
        # How the UNet's blocks are compiled (`enable_compile`); None: eager, the reference.
        self.compiled: CompileSettings | None = None
        # The backbone family's step rule over this scheduler's configuration (DDIM's ᾱ table, or flow matching's
        # shifted σ): only its schedule is read; the update is written out in `steps` so that the guided and
        # unguided predictions can enter it separately. A DDIM backbone also learns what its network predicts.
        self.rule = RULES[backbone.RULE](scheduler_config)
        self.scheduler_config = self.rule.config
        backbone.set_rule(self.rule)
        device = check_device(device, "device") if device is not None else default_device()
        # dtype None or "auto": float16 on CUDA (bfloat16 for the flow transformers), bfloat16 for an SD-size model
        # on a CPU with native bf16, float32 elsewhere (`loading.auto_dtype`).
        dtype = loading.auto_dtype(device, backbone) if dtype is None or dtype == "auto" else check_dtype(dtype,
                                                                                                          "dtype")
        self.device, self.dtype = backbone.device, backbone.dtype
        self.to(device, dtype)
        for module in backbone.modules:
            module.eval().requires_grad_(False)

    # ----------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, id_or_folder: str | Path = DEFAULT_MODEL, *, device=None, dtype=None,
                        local_files_only: bool = False, allow_pickle: bool = False) -> "DragonPipeline":
        """Load a diffusers layout (hub id or folder); the backbone class is chosen from the model's configuration
        (`loading.BACKBONES`). Safetensors only unless allow_pickle=True."""
        backbone, scheduler, own = loading.load_pretrained(id_or_folder, local_files_only=local_files_only,
                                                           allow_pickle=allow_pickle)
        pipe = cls(backbone=backbone, scheduler=scheduler, device=device, dtype=dtype,
                   recommended_settings=own.get("settings"), default_max_resolution=own.get("max_resolution"))
        source, _ = loading.resolve_source(id_or_folder)
        pipe.model_id = str(id_or_folder)
        pipe.model_path = Path(source) if Path(source).is_dir() else None
        if loading.is_bundled(pipe.model_id):
            pipe.default_max_resolution = BUNDLED_RESOLUTION
        return pipe

    @classmethod
    def bundled(cls, name: str = BUNDLED_ID, *, device=None, dtype=None) -> "DragonPipeline":
        """A small shapes model shipped inside the package (128 px scenes of coloured shapes), offline: the UNet
        model (`dragondiff:shapes`, the default) or the flow transformer (`dragondiff:shapes-flow`)."""
        if not loading.is_bundled(name):
            raise ValueError(f"name: {name!r} is not a bundled model; bundled: {', '.join(loading.BUNDLED_IDS)}")
        return cls.from_pretrained(name, device=device, dtype=dtype, local_files_only=True)

    @classmethod
    def from_single_file(cls, path: str | Path, *, config: str | Path = DEFAULT_MODEL, device=None, dtype=None,
                         local_files_only: bool = False, allow_pickle: bool = False) -> "DragonPipeline":
        """Load one original-layout checkpoint (SD1.x, SD2.x or SDXL). `config` is a diffusers folder or hub id of
        the same family giving the component configs and tokenizers (e.g. stabilityai/stable-diffusion-xl-base-1.0
        for an SDXL file; offline, pass a local folder)."""
        backbone, scheduler = loading.load_single_file(path, config=config, local_files_only=local_files_only,
                                                       allow_pickle=allow_pickle)
        pipe = cls(backbone=backbone, scheduler=scheduler, device=device, dtype=dtype)
        pipe.model_id, pipe.model_path = str(path), Path(path)
        return pipe

    @classmethod
    def from_pipe(cls, pipeline, *, device=None, dtype=None) -> "DragonPipeline":
        """A DragonPipeline on the modules of a loaded diffusers pipeline (StableDiffusionPipeline, its img2img,
        StableDiffusionXLPipeline, ...): the same UNet, VAE, text encoder(s) and tokenizer(s) objects, no tensor
        copied, with the LoRAs loaded into them; the scheduler's configuration gives the ᾱ table. Generating and
        editing then share one set of weights. Device and dtype stay the pipeline's unless given."""
        missing = [n for n in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
                   if getattr(pipeline, n, None) is None]
        if missing:
            raise TypeError(f"pipeline: expected a loaded diffusers Stable Diffusion pipeline (SD1.x, SD2.x, SDXL) "
                            f"with unet, vae, text_encoder, tokenizer and scheduler; {type(pipeline).__name__} "
                            f"lacks {', '.join(missing)}")
        unet = pipeline.unet
        cls_ = loading.backbone_class(unet.config, pipeline.scheduler.config)
        extra = {"text_encoder_2": getattr(pipeline, "text_encoder_2", None),
                 "tokenizer_2": getattr(pipeline, "tokenizer_2", None)}
        if cls_.NAME == "SDXL":
            extra["force_zeros_for_empty_prompt"] = pipeline.config.get("force_zeros_for_empty_prompt", True)
        backbone = cls_.from_components(unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer, **extra)
        pipe = cls(backbone=backbone, scheduler=pipeline.scheduler,
                   device=device if device is not None else unet.device,
                   dtype=dtype if dtype is not None else unet.dtype)
        source = getattr(pipeline, "name_or_path", None) or pipeline.config.get("_name_or_path")
        if source:
            pipe.model_id = str(source)
            pipe.model_path = Path(source) if Path(source).is_dir() else None
        return pipe

    # ----------------------------------------------------------------------------------------------- LoRAs

    @property
    def lora_set(self):
        """The LoRAs on this pipeline's model (`dragondiff.lora.LoraSet`), made on first use."""
        from .lora import LoraSet

        if getattr(self, "_lora_set", None) is None or self._lora_set.backbone is not self.backbone:
            self._lora_set = LoraSet(self.backbone)
        return self._lora_set

    @property
    def loras(self) -> list[dict]:
        """The loaded LoRAs: file, path, sha256, scale, adapter_name, fused (what a sidecar records)."""
        return self.lora_set.records() if self.backbone.LORA else []

    def load_lora_weights(self, file_or_folder, adapter_name: str | None = None, scale: float = 1.0, *,
                          allow_pickle: bool = False) -> str:
        """Add a LoRA to the UNet and text encoder(s) (diffusers' loaders and peft): a file or a folder in diffusers',
        peft's or kohya's (civitai) layout, weighted by `scale`. Safetensors only unless allow_pickle=True. A file
        whose layers do not fit this model is refused (ValueError naming it) before anything changes. Returns the
        adapter name (`adapter_name`, or one made from the file name), which `set_lora_scales` takes."""
        if not self.backbone.LORA:
            raise ValueError(f"lora: LoRAs on {self.backbone.NAME} models are not supported yet; supported: the UNet "
                             "families (SD1.x, SD2.x, SDXL)")
        with self.backbone.lock:
            lora = self.lora_set.load(file_or_folder, adapter_name, scale, allow_pickle)
            self._after_lora_change()
        return lora.name

    def set_lora_scales(self, scales: dict) -> "DragonPipeline":
        """Weights of loaded LoRAs by adapter name ({"style": 0.8, "subject": 0.5}); the others keep theirs."""
        with self.backbone.lock:
            self.lora_set.set_scales(scales)
            self._after_lora_change()
        return self

    def set_adapters(self, adapter_names, adapter_weights=None) -> "DragonPipeline":
        """diffusers' spelling: the named LoRAs at these weights (1.0 each when None); the others at 0."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = [1.0] * len(names) if adapter_weights is None else (
            [adapter_weights] * len(names) if not isinstance(adapter_weights, (list, tuple)) else list(adapter_weights))
        if len(weights) != len(names):
            raise ValueError(f"adapter_weights: {len(weights)} weights for {len(names)} adapter names")
        scales = {n: 0.0 for n in self.lora_set.loras}
        scales.update(dict(zip(names, weights)))
        unknown = [n for n in names if n not in self.lora_set.loras]
        if unknown:
            raise ValueError(f"adapter_names: no LoRA named {unknown[0]!r}; loaded: {sorted(self.lora_set.loras)}")
        return self.set_lora_scales(scales)

    def fuse_lora(self, permanent: bool = False) -> "DragonPipeline":
        """Add the weighted LoRA deltas into the base weights: peft's wrappers then run only the base layers (no
        LoRA matmuls; a compiled UNet is recompiled around them once). Unfusing subtracts them (exact to rounding).
        `permanent=True` also removes the wrappers (diffusers' unload, which keeps the fused weights): an edit costs
        what it costs without LoRAs, and the LoRAs can no longer be unfused, re-weighted, unloaded or added to
        (load the model again for that); `loras` still lists them, fused."""
        with self.backbone.lock:
            self.lora_set.fuse(permanent)
            self._after_lora_change()
        return self

    def unfuse_lora(self) -> "DragonPipeline":
        with self.backbone.lock:
            self.lora_set.unfuse()
            self._after_lora_change()
        return self

    def unload_lora_weights(self, adapter_names=None) -> "DragonPipeline":
        """Remove all LoRAs (or those named); unfused ones leave the model's weights exactly as they were."""
        with self.backbone.lock:
            self.lora_set.unload(adapter_names)
            self._after_lora_change()
        return self

    def _after_lora_change(self) -> None:
        """Compiled blocks hold the layers they were compiled with: compile again around the new ones."""
        if self.compiled is not None:
            uncompile_unet(self.backbone.denoiser, self.backbone.REPEATED_BLOCKS)
            compile_unet(self.backbone.denoiser, self.compiled, self.backbone.REPEATED_BLOCKS)

    def to(self, device=None, dtype=None) -> "DragonPipeline":
        """Move / cast every component. Arguments are checked first, and a failed move (e.g. out of memory)
        puts the components back, so the pipeline stays usable as it was."""
        new_device = self.device if device is None else check_device(device, "device")
        new_dtype = self.dtype if dtype is None else check_dtype(dtype, "dtype")
        try:
            self.backbone.to(new_device, new_dtype)
        except (RuntimeError, AssertionError) as e:
            raise RuntimeError(f"device={new_device}, dtype={new_dtype}: moving the model failed ({e}); the "
                               "pipeline is unchanged") from e
        self.device, self.dtype = new_device, new_dtype
        if new_device.type == "cpu" and new_dtype == torch.bfloat16 and not loading.native_bf16():
            warnings.warn(f"dtype=bfloat16 on this CPU ({torch.backends.cpu.get_cpu_capability()}, no native bf16): "
                          "torch emulates it, many times slower than float32 (docs/speed.md); use float32 here",
                          PerformanceNote, stacklevel=2)
        return self

    # Read-only views of the backbone's components, for users who want to inspect or reuse them.
    denoiser = property(lambda self: self.backbone.denoiser)  # the UNet or the transformer
    unet = property(lambda self: getattr(self.backbone, "unet", None))
    transformer = property(lambda self: getattr(self.backbone, "transformer", None))
    vae = property(lambda self: self.backbone.vae)
    text_encoder = property(lambda self: self.backbone.text_encoder)
    tokenizer = property(lambda self: self.backbone.tokenizer)
    text_encoder_2 = property(lambda self: getattr(self.backbone, "text_encoder_2", None))  # SDXL's second
    tokenizer_2 = property(lambda self: getattr(self.backbone, "tokenizer_2", None))

    @property
    def uses_one_backward(self) -> bool:
        """Whether edits send both energy gradients through one batched backward (`one_backward`, or by device)."""
        if self.one_backward is None:
            return self.device.type == "cuda" and not self.backbone.channels_last
        if self.one_backward and self.backbone.channels_last:
            raise ValueError("one_backward=True: the batched backward (torch.vmap) cannot run channels-last "
                             "convolutions; use one_backward=None/False or enable_channels_last(False)")
        return self.one_backward

    def enable_vae_tiling(self, enabled: bool = True, tile_px: int | None = None) -> "DragonPipeline":
        """Encode and decode large images in overlapping tiles (diffusers' VAE tiling), so that the VAE's memory
        stays that of one tile; the UNet work is unchanged. Tiles are blended at their seams, so pixels differ
        slightly from an untiled decode: off by default. `tile_px`: tile size in pixels (the VAE's own default,
        512 for SD1.5, when None)."""
        if tile_px is not None:
            tile_px = check_int(tile_px, "tile_px", 2 * self.backbone.vae_factor, 8192)
        self.backbone.set_vae_tiling(enabled, tile_px)
        return self

    def enable_channels_last(self, enabled: bool = True) -> "DragonPipeline":
        """Run the UNet's and VAE's convolutions channels-last: on the CPU the batch-2 CFG call measured 16 % and the
        backward 19 % faster at 512 px (docs/speed.md); outputs within about 1 grey level of the default layout, which
        stays the default so that earlier spec files and sidecars rerun bit for bit. The energy gradients then take
        two backward passes (torch.vmap cannot batch channels-last convolutions)."""
        with self.backbone.lock:
            self.backbone.set_channels_last(bool(enabled))
        return self

    def enable_gradient_checkpointing(self, enabled: bool = True) -> "DragonPipeline":
        """Recompute the denoiser's block activations in the guidance backward instead of keeping them (diffusers'
        `enable_gradient_checkpointing` on the UNet or transformer; the backbones' written-out forwards honour it
        as the stock ones do). It acts on the passes with gradient only, the guided feature pass: less memory
        there (`dragondiff bench memory --gradient-checkpointing`) for about one more feature forward per guided
        step; the same numbers as without it. Off by default."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
        denoiser = self.backbone.denoiser
        with self.backbone.lock:
            if enabled:
                denoiser.enable_gradient_checkpointing()
            else:
                denoiser.disable_gradient_checkpointing()
        return self

    def enable_compile(self, backend: str = "inductor", mode: str | None = None) -> "DragonPipeline":
        """Run the UNet's transformer blocks compiled (`torch.compile`, regional; see `dragondiff.compile`). The
        first edit at a new size or batch pays the compilation (cached by torch across processes); results stay
        within a few grey levels of eager. `backend="aot_eager"` traces without generating code (for tests)."""
        settings = CompileSettings(backend, mode)
        with self.backbone.lock:
            compile_unet(self.backbone.denoiser, settings, self.backbone.REPEATED_BLOCKS)
        self.compiled = settings
        return self

    def disable_compile(self) -> "DragonPipeline":
        """Eager UNet calls again."""
        with self.backbone.lock:
            uncompile_unet(self.backbone.denoiser, self.backbone.REPEATED_BLOCKS)
        self.compiled = None
        return self

    def schedule(self, num_inference_steps: int, latent_hw: tuple[int, int] | None = None) -> Schedule:
        """The n steps of an edit at this latent size (the step rule's times and levels; checked against the
        scheduler before any model work)."""
        return self.rule.schedule(int(num_inference_steps), latent_hw)

    # ------------------------------------------------------------------------------------------------ edits

    def edit(self, spec: EditSpec | Plan, *, generator: torch.Generator | None = None,
             callback_on_step_end: Callable | None = None, return_intermediates: bool = False,
             progress: bool = True, bank_device=None) -> EditResult:
        """Run one edit described by an `EditSpec` (or a `Plan` of one made for this model: `plan`).

        Args:
            spec: the edit, or its plan.
            generator: a torch.Generator for the regional-SDE noise, instead of one seeded with `spec.seed`.
            callback_on_step_end: `callback(pipe, step, timestep, {"latents": z})` after every sampling step;
                it may return `{"latents": new_z}` (same shape) and/or `{"interrupt": True}` to stop the edit
                there (the result is then decoded from the current latent and flagged).
            return_intermediates: also return every latent, guidance tensor and the inversion.
            progress: show a progress bar.
            bank_device: where the memory bank lives (default: the pipeline's device; on CUDA the CPU when the bank
                would take more than half the free GPU memory). "cpu" offloads it on a small GPU.
        Returns:
            An `EditResult` whose `spec` is the resolved spec (every default filled in).
        """
        # 1. Check the runtime arguments.
        if not isinstance(spec, (EditSpec, Plan)):
            raise TypeError(f"spec: expected an EditSpec (or a Plan from pipe.plan), got {type(spec).__name__}")
        self._check_runtime(generator, callback_on_step_end, bank_device)
        # 2. Resolve the defaults (the task registry, the model's recommended settings, a reused inversion);
        # 3. the inputs at the working size; 4. the task (geometry, masks, energies) through the registry.
        spec, prep, task = self.plan(spec)
        self._warn_long_prompts(spec)
        # 5. How strongly to guide, in one value; whether the image prompt takes part.
        preset = get_preset(spec.preset)
        spec = self._resolve_image_prompt(spec, preset)
        guidance = Guidance(cfg_scale=spec.guidance_scale, energy_scale=spec.energy_scale * ENERGY_UNIT,
                            gradient_coef=spec.gradient_coef, gain=preset.guidance_gain,
                            sde_strength=spec.sde_strength, bank_window=spec.bank_steps, ip_scale=spec.ip_scale)
        # 6. Invert, sample, decode.
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(int(spec.seed))
        return self._run(task, prep, guidance, preset, spec.num_inference_steps, spec=spec, generator=generator,
                         callback=callback_on_step_end, intermediates=return_intermediates, progress=progress,
                         bank_device=bank_device)

    def plan(self, spec: EditSpec | Plan) -> Plan:
        """Steps 2-4 of `edit` (`planning.plan_edit`): the resolved spec, the inputs at the working size and the
        task, for this model's grid and settings. A `Plan` made elsewhere (the command line plans each job before
        loading the model) is taken as it is when it was made for the same grid, settings and working size."""
        made_for = self._plan_key()
        if isinstance(spec, Plan):
            if spec.made_for != made_for:
                raise ValueError("spec: this Plan was made for another model's grid or settings; plan the EditSpec "
                                 "again for this pipeline (pipe.plan(spec))")
            return spec
        inversion = spec.image if isinstance(spec.image, Inversion) else None
        if inversion is not None and spec.prompt is not None and spec.prompt != inversion.prompt:
            raise ValueError(f"prompt: {spec.prompt!r} differs from the prompt the inversion was made with "
                             f"({inversion.prompt!r}); pass the same prompt (or none) or invert again")
        return plan_edit(spec, factors=made_for[0], recommended=self.recommended_settings,
                         default_max_resolution=self.default_max_resolution,
                         prepare=lambda s: self._prepare(s.image, s.max_resolution, s.num_inference_steps))

    def takes_plan(self, plan: Plan) -> bool:
        """Whether `plan` was made for this model's grid, settings and default working size."""
        return plan.made_for == self._plan_key()

    def _plan_key(self) -> tuple:
        return planned_for((self.backbone.vae_factor, self.backbone.feature_factor), self.recommended_settings,
                           self.default_max_resolution)

    def _resolve_image_prompt(self, spec: EditSpec, preset: Preset) -> EditSpec:
        """image_prompt None: on where the preset uses it and an adapter is loaded; True without one is an error."""
        loaded = self.backbone.image_prompt is not None
        if spec.image_prompt and not loaded:
            raise ValueError("image_prompt: true, but no IP-Adapter is loaded (pipe.load_ip_adapter(...), or "
                             "--ip-adapter on the command line)")
        use = spec.image_prompt if spec.image_prompt is not None else (preset.image_prompt and loaded)
        return dataclasses.replace(spec, image_prompt=bool(use))

    # ------------------------------------------------------------------------------------------ image prompt

    def load_ip_adapter(self, weights, image_encoder=None, *, allow_pickle: bool = False,
                        local_files_only: bool = False) -> "DragonPipeline":
        """Load an IP-Adapter for the image prompt: DiffEditor's `ip_sd15_64` (the official demo's), IP-Adapter
        Plus or IP-Adapter for SD1.5, as `.safetensors` (flat, `image_proj.` / `ip_adapter.` prefixes) or, with
        allow_pickle=True, as the released `.bin` (read by torch's weights-only unpickler; `dragondiff
        convert-ip-adapter` writes the safetensors). `image_encoder`: a CLIPVisionModelWithProjection folder or hub
        id (or a loaded model). Edits with the `official` and `fast` presets then use the image prompt unless their
        spec says image_prompt=False."""
        from . import image_prompt

        if not self.backbone.IMAGE_PROMPT:
            self.backbone.load_image_prompt(None)  # the family's refusal, before any file is read
        with self.backbone.lock:
            prompt = image_prompt.load(self.backbone.denoiser, weights, image_encoder, allow_pickle=allow_pickle,
                                       local_files_only=local_files_only)
            self.backbone.load_image_prompt(prompt)
        return self

    def unload_ip_adapter(self) -> "DragonPipeline":
        """Back to text-only cross-attention."""
        self.backbone.unload_image_prompt()
        return self

    # The task methods: typed wrappers that build an EditSpec and run it. Their own arguments are the task's Params
    # fields (dragondiff.tasks.<task>); `**settings` are EditSpec's common fields, by keyword: guidance_scale,
    # energy_scale, gradient_coef, bank_steps, preset, seed, num_inference_steps, max_resolution, sde_strength.

    def move(self, image, mask, offset=(0, 0), scale: float = 1.0, *, prompt: str | None = None,
             reference_region=None, w_edit: float | None = None, w_content: float | None = None,
             w_contrast: float | None = None, w_inpaint: float | None = None, generator=None,
             callback_on_step_end=None, return_intermediates: bool = False, progress: bool = True,
             bank_device=None, **settings) -> EditResult:
        """Move the masked object by offset=(dx, dy) original-image pixels; scale != 1 also resizes it.

        Official geometry: shift, then scale about the image centre.

        Args:
            image: PIL image, HxWx3 uint8 array, path, or an `Inversion` from `invert`.
            mask: the object (PIL, bool/0-1/0-255 array or path, the size of the image).
            offset: (dx, dy) in original pixels.
            scale: resize factor in (0, 10].
            prompt: the edit prompt (inversion, sampling and feature passes); default "" or an Inversion's.
            reference_region: optional mask of what the vacated area should come to look like (default: the
                background).
            w_edit, w_content, w_contrast, w_inpaint: energy weights (None: the defaults of `MoveParams`).
            generator, callback_on_step_end, return_intermediates, progress, bank_device: see `edit`.
            **settings: EditSpec's common fields (guidance_scale, energy_scale, gradient_coef, bank_steps, preset,
                seed, num_inference_steps, max_resolution, sde_strength; see `EditSpec`).
        Returns:
            An `EditResult` (image at the working size, the resolved spec, masks, energies, pass counts).
        """
        _positional(MoveParams, offset=offset, scale=scale)
        params = dict(mask=mask, offset=offset, scale=scale, reference_region=reference_region, w_edit=w_edit,
                      w_content=w_content, w_contrast=w_contrast, w_inpaint=w_inpaint)
        return self._edit_task("move", image, params, prompt, settings, generator=generator,
                               callback_on_step_end=callback_on_step_end, return_intermediates=return_intermediates,
                               progress=progress, bank_device=bank_device)

    def drag(self, image, points, mask, *, prompt: str | None = None, w_edit: float | None = None,
             w_content: float | None = None, w_inpaint: float | None = None, generator=None,
             callback_on_step_end=None, return_intermediates: bool = False, progress: bool = True,
             bank_device=None, **settings) -> EditResult:
        """Drag content from handle points to target points inside an editable mask (pixels outside it are kept).

        Args:
            image: PIL image, HxWx3 uint8 array, path, or an `Inversion` from `invert`.
            points: [((handle_x, handle_y), (target_x, target_y)), ...] in original pixels.
            mask: the editable area (targets must lie inside it).
            prompt: the edit prompt; default "" or an Inversion's.
            w_edit, w_content, w_inpaint: energy weights (None: the defaults of `DragParams`).
            generator, callback_on_step_end, return_intermediates, progress, bank_device: see `edit`.
            **settings: EditSpec's common fields, as for `move`.
        Returns:
            An `EditResult`.
        """
        _positional(DragParams, points=points)
        params = dict(points=points, mask=mask, w_edit=w_edit, w_content=w_content, w_inpaint=w_inpaint)
        return self._edit_task("drag", image, params, prompt, settings, generator=generator,
                               callback_on_step_end=callback_on_step_end, return_intermediates=return_intermediates,
                               progress=progress, bank_device=bank_device)

    def replace_appearance(self, image, mask, reference, reference_mask, *, prompt: str | None = None,
                           reference_prompt: str | None = None, w_edit: float | None = None,
                           w_content: float | None = None, generator=None, callback_on_step_end=None,
                           return_intermediates: bool = False, progress: bool = True, bank_device=None,
                           **settings) -> EditResult:
        """Give the masked object in `image` the appearance of the masked object in `reference`.

        Args:
            image: PIL image, HxWx3 uint8 array, path, or an `Inversion` from `invert`.
            mask: the object to change.
            reference: the image whose object lends its appearance (stretched to the image's working size).
            reference_mask: that object, the size of `reference`.
            prompt: the edit prompt; default "" or an Inversion's.
            reference_prompt: the reference's inversion prompt (default: `prompt`).
            w_edit, w_content: energy weights (None: the defaults of `AppearanceParams`).
            generator, callback_on_step_end, return_intermediates, progress, bank_device: see `edit`.
            **settings: EditSpec's common fields, as for `move`.
        Returns:
            An `EditResult`.
        """
        params = dict(mask=mask, reference=reference, reference_mask=reference_mask,
                      reference_prompt=reference_prompt, w_edit=w_edit, w_content=w_content)
        return self._edit_task("appearance", image, params, prompt, settings, generator=generator,
                               callback_on_step_end=callback_on_step_end, return_intermediates=return_intermediates,
                               progress=progress, bank_device=bank_device)

    def paste(self, image, reference, reference_mask, offset=(0, 0), scale: float = 1.0, *,
              prompt: str | None = None, reference_prompt: str | None = None, w_edit: float | None = None,
              w_content: float | None = None, generator=None, callback_on_step_end=None,
              return_intermediates: bool = False, progress: bool = True, bank_device=None,
              **settings) -> EditResult:
        """Paste the masked object of `reference` into `image`, at its reference position shifted by
        offset=(dx, dy) base-image pixels, scaled by `scale` about the image centre (official geometry).

        Args:
            image: PIL image, HxWx3 uint8 array, path, or an `Inversion` from `invert`.
            reference: the image holding the object (stretched to the image's working size).
            reference_mask: that object, the size of `reference`.
            offset: (dx, dy) in base-image pixels.
            scale: resize factor in (0, 4].
            prompt: the edit prompt; default "" or an Inversion's.
            reference_prompt: the reference's inversion prompt (default: `prompt`).
            w_edit, w_content: energy weights (None: the defaults of `PasteParams`).
            generator, callback_on_step_end, return_intermediates, progress, bank_device: see `edit`.
            **settings: EditSpec's common fields, as for `move`.
        Returns:
            An `EditResult`.
        """
        _positional(PasteParams, offset=offset, scale=scale)
        params = dict(reference=reference, reference_mask=reference_mask, offset=offset, scale=scale,
                      reference_prompt=reference_prompt, w_edit=w_edit, w_content=w_content)
        return self._edit_task("paste", image, params, prompt, settings, generator=generator,
                               callback_on_step_end=callback_on_step_end, return_intermediates=return_intermediates,
                               progress=progress, bank_device=bank_device)

    def reshape_face(self, image, reference=None, target_landmarks=None, *, landmarks=None,
                     reference_landmarks=None, groups=None, face=None, reference_face=None,
                     prompt: str | None = None, w_edit: float | None = None, generator=None,
                     callback_on_step_end=None, return_intermediates: bool = False, progress: bool = True,
                     bank_device=None, **settings) -> EditResult:
        """Reshape the face in `image` toward the face in `reference` (or onto `target_landmarks`) by dragging its
        68 landmarks, as the official demo's face task: both faces aligned FFHQ-style, landmarks detected again on
        the aligned crops, every landmark dragged onto its target (prompt "a photo of a human face", energy 3,
        w_edit 12, SDE 0.2 everywhere, image prompt 0.05 when an adapter is loaded).

        Args:
            image: the photo (PIL image, HxWx3 uint8 array or path).
            reference: a photo of the face whose landmarks are the targets.
            target_landmarks: instead of a reference, 68 (x, y) targets in the photo's pixels (an array or a
                JSON/.npy/txt file), e.g. an edited copy of `dragondiff.face.detect(photo)[0].landmarks`.
            landmarks, reference_landmarks: the faces' 68 landmarks, given instead of detected (no dlib needed).
            groups: the landmark groups to reshape (jaw, brows, nose, eyes, mouth; default all); the others stay.
            face, reference_face: which face when a photo shows several: an index into the detected faces or a
                box (x0, y0, x1, y1) around it.
            prompt: default "a photo of a human face".
            w_edit: energy weight (default 12).
            generator, callback_on_step_end, return_intermediates, progress, bank_device: see `edit`.
            **settings: EditSpec's common fields, as for `move`.
        Returns:
            An `EditResult`: `image` the edited aligned crop at the working size, `photo` the edit put back into
            the photo at its full size, `landmarks` the handles and targets on the aligned crop.
        """
        params = dict(reference=reference, target_landmarks=target_landmarks, landmarks=landmarks,
                      reference_landmarks=reference_landmarks, groups=groups, face=face,
                      reference_face=reference_face, w_edit=w_edit)
        return self._edit_task("face", image, params, prompt, settings, generator=generator,
                               callback_on_step_end=callback_on_step_end, return_intermediates=return_intermediates,
                               progress=progress, bank_device=bank_device)

    def _edit_task(self, task: str, image, params: dict, prompt, settings: dict, **runtime) -> EditResult:
        """A task method's spec, run by `edit`. `bank_start=k` (the release's move/drag keyword) still means
        bank_steps=(k, None) for this release, with a DeprecationWarning."""
        settings = dict(settings)
        if "bank_start" in settings:
            start = settings.pop("bank_start")
            if settings.get("bank_steps") is not None:
                raise TypeError("bank_start: give bank_steps=(first, last) or the deprecated bank_start, not both")
            warnings.warn("bank_start=k is deprecated; use bank_steps=(k, None)", DeprecationWarning, stacklevel=3)
            settings["bank_steps"] = None if start is None else (check("bank_step", start, "bank_start"), None)
        for key in settings:
            if key not in COMMON_FIELDS or key == "prompt":
                raise TypeError(f"{task}() got an unexpected keyword argument {key!r}")
        spec = EditSpec(task=task, image=image, params=params, prompt=prompt, **settings)
        return self.edit(spec, **runtime)

    def invert(self, image, *, prompt: str = "", max_resolution: int | None = None,
               num_inference_steps: int | None = None, preset: str = DEFAULT_PRESET, progress: bool = True,
               bank_device=None) -> Inversion:
        """DDIM-invert an image once, for several edits: every task accepts the result in place of its image and
        then skips its inversion (same output as inverting inside the call; `pass_counts` shows the saving).

        Args:
            image: PIL image, HxWx3 uint8 array or path.
            prompt: the inversion prompt; edits of this inversion use it as their prompt.
            max_resolution: working resolution (area about max_resolution², sides multiples of 64); default the
                pipeline's `default_max_resolution` (768, the bundled model's 128).
            num_inference_steps: DDIM steps (default: the preset's, 50 or `fast`'s 20); edits of this inversion use
                the same number.
            preset: the preset whose step count is the default (the edits may still use any preset).
            progress: show a progress bar.
            bank_device: where its bank (and cached reference features) live: default the CPU on CUDA, so that
                kept inversions hold no GPU memory; the GPU makes each later edit faster.
        Returns:
            An `Inversion` holding the working-size image, the inverted latents and the memory bank (CPU-resident
            on CUDA), with its size in bytes (`nbytes`).
        """
        if isinstance(image, Inversion):
            raise TypeError("image: already an Inversion; pass it to an edit method instead")
        check_string(prompt, "prompt")
        if bank_device is not None:
            check_device(bank_device, "bank_device")
        steps = check("num_inference_steps",
                      get_preset(preset).steps if num_inference_steps is None else num_inference_steps)
        if max_resolution is None:
            max_resolution = self.default_max_resolution
        prep = self._prepare(image, max_resolution, steps)
        schedule = self.schedule(steps, prep.latent_hw)
        with self.backbone.lock, tqdm(total=steps, desc="dragondiff invert", leave=False,
                                      disable=not progress) as bar:
            latents, bank = self._invert_batch(prep.pixels, [prompt], schedule, PassCounts(),
                                               self._bank_device(bank_device))
            bar.update(steps)
        return Inversion(image=prep.image, original_hw=prep.original_hw, max_resolution=max_resolution,
                         prompt=prompt, num_inference_steps=steps, latents=latents.cpu(), bank=bank,
                         model_key=self.backbone.key, dtype=self.dtype)

    def reconstruct(self, image, *, prompt: str | None = None, use_bank: bool = True, guidance_scale: float = 1.0,
                    preset: str = DEFAULT_PRESET, num_inference_steps: int | None = None,
                    max_resolution: int | None = None, return_intermediates: bool = False,
                    progress: bool = True) -> EditResult:
        """No edit: DDIM inversion, then unguided sampling from z_T (with the memory bank replacing the decoder
        self-attention K/V at every step if use_bank). Measures how faithfully the model inverts an image.

        Args: as `move` (image, prompt, guidance_scale, preset, num_inference_steps, max_resolution,
            return_intermediates, progress); use_bank: replace the decoder self-attention K/V at every step.
            The step count defaults to an Inversion's, else the preset's.
        """
        inversion = image if isinstance(image, Inversion) else None
        preset_ = get_preset(preset)
        steps = num_inference_steps or (inversion.num_inference_steps if inversion else preset_.steps)
        steps = check("num_inference_steps", steps)
        resolution = max_resolution or (inversion.max_resolution if inversion else self.default_max_resolution)
        prep = self._prepare(image, resolution, steps)
        if prompt is None:
            prompt = "" if inversion is None else inversion.prompt
        check_string(prompt, "prompt")
        h, w = prep.latent_hw
        nothing = torch.zeros(1, 1, h, w)
        task = Task(name="reconstruct", pixels=prep.pixels, inversion_prompts=[prompt], prompt=prompt,
                    grid=prep.grid, edit_region=nothing, sde_region=nothing, bank_mode=REPLACE if use_bank else PLAIN)
        guidance = Guidance(cfg_scale=check("guidance_scale", guidance_scale), energy_scale=0.0, gradient_coef=0.0)
        return self._run(task, prep, guidance, preset_, steps, generator=torch.Generator("cpu").manual_seed(0),
                         intermediates=return_intermediates, progress=progress)

    def text_to_image(self, prompts: list[str], *, num_inference_steps: int = 50, guidance_scale: float = 4.0,
                      generator: torch.Generator | None = None, size_hw: tuple[int, int] | None = None) -> list:
        """Generate one image per prompt (plain DDIM with CFG, no edit): what the model draws from text alone.
        size_hw: the image size (default: the default working resolution, square). Returns HxWx3 uint8 arrays."""
        steps = check("num_inference_steps", num_inference_steps)
        h, w = size_hw or (self.default_max_resolution,) * 2
        f = self.backbone.vae_factor
        schedule = self.schedule(steps, (h // f, w // f))
        z = torch.randn((len(prompts), self.backbone.latent_channels, h // f, w // f), generator=generator)
        with self.backbone.lock:
            cond = self.backbone.condition(prompts, (h, w))
            uncond = self.backbone.unconditional((h, w), len(prompts))
            z = sample_text_to_image(self.backbone, schedule, z.to(self.device), cond, uncond,
                                     check("guidance_scale", guidance_scale))
            return [self.backbone.decode(z[k : k + 1]) for k in range(len(prompts))]

    # ------------------------------------------------------------------------------------------- internals

    def _warn_long_prompts(self, spec) -> None:
        limit = self.backbone.max_prompt_tokens
        texts = {"prompt": spec.prompt, **{f.name: getattr(spec.params, f.name) for f in spec.params.fields()
                                           if f.metadata["kind"] == TEXT}}
        for name, text in texts.items():
            if text and self.backbone.prompt_length(text) > limit:
                warnings.warn(f"{name}: longer than the text encoder's {limit} tokens; the rest is cut off",
                              stacklevel=3)

    def _check_runtime(self, generator, callback, bank_device) -> None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator is not None and generator.device.type not in ("cpu", self.device.type):
            raise ValueError(f"generator is on {generator.device}; use a CPU generator or one on {self.device}")
        if callback is not None and not callable(callback):
            raise TypeError("callback_on_step_end must be callable(pipeline, step, timestep, {'latents': z})")
        if bank_device is not None:
            check_device(bank_device, "bank_device")

    def _prepare(self, image, max_resolution: int, num_inference_steps: int) -> Prepared:
        factors = (self.backbone.vae_factor, self.backbone.feature_factor)
        if isinstance(image, Inversion):
            return self._prepare_inversion(image, max_resolution, num_inference_steps, factors)
        return Prepared.from_image(load_image(image, "image"), max_resolution, *factors)

    def _prepare_inversion(self, inv: Inversion, max_resolution: int, num_inference_steps: int,
                           factors: tuple[int, int]) -> Prepared:
        """An edit of an already inverted image: check that it fits this model and these options."""
        if inv.model_key != self.backbone.key or inv.dtype != self.dtype:
            raise ValueError("image: this Inversion was made by another model or dtype; invert with this pipeline")
        for key, value, own in (("max_resolution", max_resolution, inv.max_resolution),
                                ("num_inference_steps", num_inference_steps, inv.num_inference_steps)):
            if value != own:
                raise ValueError(f"{key}={value!r} differs from the inversion's ({own}); leave it out or invert again")
        return Prepared(inv.original_hw, inv.size_hw, inv.image, torch.from_numpy(to_pixels(inv.image)),
                        *factors, inversion=inv)

    def _bank_device(self, bank_device, latent_hw=None, steps: int = 50, images: int = 1) -> torch.device:
        """Where a bank lives: as asked; else on the compute device, except on CUDA when the bank would not fit
        in half of the free GPU memory, or not beside the edit's largest pass (or when its size is unknown: `invert`'s banks outlive the edit)."""
        if bank_device is not None:
            return torch.device(bank_device)
        if self.device.type != "cuda":
            return self.device
        if latent_hw is None:
            return torch.device("cpu")
        free, _ = torch.cuda.mem_get_info(self.device)
        bank = self.backbone.bank_bytes(latent_hw, steps, images)
        # The bank must also leave room for the guidance pass's activations (SDXL at 1024 px: ~13 GiB in fp16).
        room = bank < free // 2 and bank + self.backbone.activation_bytes(latent_hw) < 0.9 * free
        return self.device if room else torch.device("cpu")

    def _invert_batch(self, pixels, prompts, schedule, counts, bank_device):
        """Inversion of images (B, 3, H, W) into their own bank: (latents (n+1, B, C, h, w), MemoryBank)."""
        controller = BankController(MemoryBank(bank_device))
        with self.backbone.memory_bank(controller):
            with counts.watch.phase("encode"):
                z0 = self.backbone.encode_image(pixels)
                cond = self.backbone.condition(prompts, tuple(pixels.shape[-2:]))
            latents = invert(self.backbone, z0, cond, schedule, controller, counts)
        return latents, controller.bank

    def _invert_parts(self, task: Task, inversion: Inversion | None, schedule: Schedule, counts: PassCounts,
                      bank_device) -> tuple[torch.Tensor, object]:
        """Phase 1: the inversion of every image of the task in one batch, with its bank; a reused base inversion
        is taken as it is and only the reference (if any) is inverted. Returns (latents (n+1, B, ...), bank)."""
        parts = [] if inversion is None else [(inversion.latents.to(self.device), inversion.bank)]
        if task.pixels.shape[0] > len(parts):
            parts.append(self._invert_batch(task.pixels[len(parts):], task.inversion_prompts[len(parts):],
                                            schedule, counts, bank_device))
        return torch.cat([lat for lat, _ in parts], dim=1), merge_banks([bank for _, bank in parts])

    def _run(self, task: Task, prep: Prepared, guidance: Guidance, preset: Preset, n: int, *, spec=None,
             generator=None, callback=None, intermediates: bool = False, progress: bool = True,
             bank_device=None) -> EditResult:
        """Invert (phase 1), sample (phase 2), decode and assemble the result (phase 3)."""
        schedule = self.schedule(n, prep.latent_hw)
        bank_device = self._bank_device(bank_device, prep.latent_hw, n, task.pixels.shape[0])
        counts = PassCounts(watch=Stopwatch(self.device if self.precise_timings else None))
        record = StepRecord(self, callback, intermediates)
        start = time.perf_counter()
        compile_counts = (graphs_built(), cache_hits()) if self.compiled is not None else (0, 0)
        try:
            return self._run_phases(task, prep, guidance, preset, n, schedule, counts, record, bank_device,
                                    spec=spec, generator=generator, progress=progress, start=start,
                                    compile_counts=compile_counts)
        except Exception as e:
            failure = explain_failure(e) if self.compiled is not None else None
            if failure is not None:
                raise failure from e
            raise

    def _run_phases(self, task, prep, guidance, preset, n, schedule, counts, record, bank_device, *, spec,
                    generator, progress, start, compile_counts) -> EditResult:
        """The three phases under the backbone's lock (`_run` turns a compiled path's give-up into CompileError)."""
        inversion = prep.inversion
        with self.backbone.lock, tqdm(total=2 * n, desc=f"dragondiff {task.name}", leave=False,
                                      disable=not progress) as bar:
            inverted, bank = self._invert_parts(task, inversion, schedule, counts, bank_device)
            bar.update(n)
            # a reused inversion (and no reference to invert) did no inversion work in this edit: its moment of
            # bookkeeping counts as sampling, so that a sidecar's 0 says the inversion was shared
            timings = {"inversion": time.perf_counter() - start if counts.inversion_unet else 0.0}
            controller = BankController(bank, union_masks=task.union_masks)
            with self.backbone.memory_bank(controller):
                z_t, ref_t = task.init_latent(inverted[-1])
                with counts.watch.phase("encode"):
                    cond = self.backbone.condition([task.prompt], prep.size_hw)
                    uncond = self.backbone.unconditional(prep.size_hw)
                    if spec is not None and spec.image_prompt:
                        cond, uncond = self.backbone.add_image_prompt(
                            cond, uncond, task.prompt_images, base_as_text=spec.ip_routing == "official")
                        counts.image_encoder += 2 * len(task.prompt_images)
                problem = Problem(task, guidance, z_t, inverted, ref_t, cond, uncond)
                state = EditState(controller, counts, generator, one_backward=self.uses_one_backward,
                                  ref_cache=None if inversion is None else inversion.feature_cache(task.prompt))
                record.bar = bar
                final, energies = sample(self.backbone, preset, schedule, problem, state, on_step=record)
            timings["sampling"] = time.perf_counter() - start - timings["inversion"]
            with counts.watch.phase("decode"):
                pixels = self.backbone.decode(final)
            timings["decode"] = time.perf_counter() - start - timings["inversion"] - timings["sampling"]
        compiled = None if self.compiled is None else {
            "backend": self.compiled.backend, "mode": self.compiled.mode,
            "graphs_built": graphs_built() - compile_counts[0], "cache_hits": cache_hits() - compile_counts[1]}
        return self._result(task, prep, preset, pixels, z_t, inverted, energies, counts, record, spec=spec,
                            seconds=time.perf_counter() - start, timings=timings, compiled=compiled)

    def _result(self, task, prep, preset, pixels, z_t, inverted, energies, counts, record, *, spec, seconds,
                timings, compiled=None) -> EditResult:
        """Phase 3: the result object (intermediates only when they were recorded)."""
        flags = list(task.flags)
        if record.stopped_at is not None:
            flags.append(f"interrupted after step {record.stopped_at} by callback_on_step_end")
        keep = record.intermediates
        return EditResult(
            image=Image.fromarray(pixels),
            task=task.name,
            preset=preset.name,
            input_image=Image.fromarray(prep.image),
            reference_image=None if task.reference_image is None else Image.fromarray(task.reference_image),
            masks=task.masks,
            edit_area=_edit_area(task, prep.size_hw),
            input_scale=prep.input_scale,
            energies=energies,
            pass_counts=counts.as_dict(),
            flags=flags,
            spec=spec,
            seconds=seconds,
            timings=timings,
            phases=dict(counts.watch.seconds),
            inverted_latents=inverted.cpu() if keep else None,
            z_T=z_t.cpu() if keep else None,
            latents=torch.stack(record.latents).cpu() if keep else None,
            guidance=[(i, r, g.cpu()) for i, r, g in record.guidance] if keep else None,
            eps_cfg=[(i, r, e.cpu()) for i, r, e in record.eps_cfg] if keep else None,
            photo=None if prep.frame is None else Image.fromarray(prep.frame.paste(pixels, task.paste_weight)),
            landmarks=task.landmarks,
            compiled=compiled,
        )


class StepRecord:
    """The pipeline's `on_step` hook: the user's `callback_on_step_end` (diffusers' convention: it may replace the
    latent or ask to stop), the progress bar, and the intermediates when they were asked for."""

    def __init__(self, pipe, callback, intermediates: bool):
        self.pipe, self.callback, self.intermediates = pipe, callback, intermediates
        self.bar = None
        self.stopped_at: int | None = None
        self.latents: list[torch.Tensor] = []
        self.guidance: list[tuple[int, int, torch.Tensor]] = []
        self.eps_cfg: list[tuple[int, int, torch.Tensor]] = []

    def __call__(self, step: StepInfo) -> None:
        if self.callback is not None:
            out = self.callback(self.pipe, step.i, step.t, {"latents": step.latent}) or {}
            if out.get("interrupt"):
                step.stop, self.stopped_at = True, step.i
            if "latents" in out:
                new = out["latents"]
                if not isinstance(new, torch.Tensor) or new.shape != step.latent.shape:
                    raise TypeError(f"callback_on_step_end must return {{'latents': tensor of shape "
                                    f"{tuple(step.latent.shape)}}}, got {type(new).__name__} "
                                    f"{tuple(getattr(new, 'shape', ()))}")
                step.latent = new.to(step.latent)
        if self.intermediates:
            self.latents.append(step.latent)
            self.eps_cfg.extend((step.i, r, e) for r, e in enumerate(step.eps_cfg))
            self.guidance.extend((step.i, r, g) for r, g in enumerate(step.gradients))
        if self.bar is not None:
            self.bar.update(1)


def _edit_area(task: Task, size_hw: tuple[int, int]) -> np.ndarray:
    """Where the edit may change the image (working size, bool): the task's guided and SDE regions, whose
    outside the content energy and the memory bank hold to the input."""
    region = torch.maximum(task.edit_region, task.sde_region).float()
    up = torch.nn.functional.interpolate(region, size=tuple(size_hw), mode="nearest")
    return up[0, 0].numpy() > 0.5


def _positional(params: type, **values) -> None:
    """Check a task method's positional task arguments: their defaults are in the signature, so None there is a
    wrong value, not "the default" (as it is for a keyword left None)."""
    for name, value in values.items():
        check_value(params.field(name), value)

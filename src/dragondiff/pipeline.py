"""`DragonPipeline`: load an SD1.x model once, then edit images with one method per task.

    pipe = DragonPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    out = pipe.move("cup.png", "cup_mask.png", offset=(120, 0), prompt="a photo of a cup")
    out.image.save("moved.png")

Each edit reads top to bottom like the algorithm: prepare inputs -> DDIM inversion with memory-bank capture ->
task-specific z_T -> guided sampling -> decode. Edits are serialised per UNet (its attention processors are
swapped for the duration of an edit); all per-edit state lives inside the call.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import inputs as io
from .attention import REPLACE, BankController, MemoryBank, bank_processors, decoder_self_attention_names
from .inversion import Inversion, merge_banks
from .presets import Preset, get_preset
from .result import EditResult
from .sampler import NonFiniteError, PassCounts, Schedule, invert, sample
from .tasks import build_appearance, build_drag, build_move, build_paste
from .tasks.base import Task, check_offset, check_scale
from .tasks.paste import scale_about_centre

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BUNDLED_ID = "dragondiff:shapes"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# The official demo's CFG scale and energy scale (slider units) per task: what an edit uses when neither the caller
# nor the model's recommended settings give a value. Chosen upstream for SD1.5 at 512 px.
OFFICIAL_SETTINGS = {
    "move": {"guidance_scale": 4.0, "energy_scale": 0.5},
    "drag": {"guidance_scale": 4.0, "energy_scale": 2.0},
    "appearance": {"guidance_scale": 5.0, "energy_scale": 2.0},
    "paste": {"guidance_scale": 4.0, "energy_scale": 1.5},
}
# A model may ship its own recommended settings in this file beside its weights (same shape as OFFICIAL_SETTINGS).
SETTINGS_FILE = "dragondiff_defaults.json"


_UNET_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _unet_lock(unet) -> threading.RLock:
    """Edits swap the attention processors of a UNet, so edits on one UNet (from any pipeline) are serialised."""
    with _LOCKS_GUARD:
        if unet not in _UNET_LOCKS:
            _UNET_LOCKS[unet] = threading.RLock()
        return _UNET_LOCKS[unet]


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _check_number(value, name: str, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}], got {value!r}")
    return value


class DragonPipeline:
    """DragonDiffusion on stock diffusers components (UNet2DConditionModel, AutoencoderKL, CLIP text encoder)."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, *, device=None, dtype=None,
                 recommended_settings: dict | None = None):
        from diffusers import DDIMScheduler

        if len(getattr(unet, "up_blocks", [])) < 3:
            raise ValueError("unet: expected an SD1.x-style UNet2DConditionModel with at least 3 up blocks")
        decoder_self_attention_names(unet)
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.recommended_settings = check_settings(recommended_settings or {}, "recommended_settings")
        # Only the DDIM ᾱ table and timesteps are used (the update is written out by hand, spec §5.2).
        self.scheduler_config = DDIMScheduler.from_config(scheduler.config).config
        device = torch.device(device) if device is not None else default_device()
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.to(device, dtype)
        for module in (self.unet, self.vae, self.text_encoder):
            module.eval().requires_grad_(False)

    # ----------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, id_or_folder: str | Path = DEFAULT_MODEL, *, device=None, dtype=None,
                        local_files_only: bool = False, allow_pickle: bool = False) -> "DragonPipeline":
        """Load an SD1.x diffusers layout (hub id or folder). Safetensors only unless allow_pickle=True."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        source = str(id_or_folder)
        if source == BUNDLED_ID:
            from .shapes import model as shapes_model

            if not shapes_model.is_available():
                raise ValueError(f"id_or_folder: {BUNDLED_ID!r} weights are not in this installation")
            source, local_files_only = str(shapes_model.WEIGHTS), True
        safe = None if allow_pickle else True
        common = {"local_files_only": local_files_only}
        try:
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", use_safetensors=safe, **common)
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", use_safetensors=safe, **common)
            text_encoder = CLIPTextModel.from_pretrained(
                source, subfolder="text_encoder", use_safetensors=safe, **common
            )
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
            scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler", **common)
        except (OSError, EnvironmentError, ValueError) as e:
            hint = "" if allow_pickle else " (only .safetensors weights are loaded unless allow_pickle=True)"
            raise ValueError(f"id_or_folder: cannot load an SD1.x model from {source!r}{hint}: {e}") from e
        return cls(unet, vae, text_encoder, tokenizer, scheduler, device=device, dtype=dtype,
                   recommended_settings=read_settings(source))

    @classmethod
    def bundled(cls, *, device=None, dtype=None) -> "DragonPipeline":
        """The small shapes model shipped inside the package (128 px scenes of coloured shapes), offline."""
        return cls.from_pretrained(BUNDLED_ID, device=device, dtype=dtype, local_files_only=True)

    @classmethod
    def from_single_file(cls, path: str | Path, *, config: str | Path = DEFAULT_MODEL, device=None, dtype=None,
                         local_files_only: bool = False, allow_pickle: bool = False) -> "DragonPipeline":
        """Load one original-layout SD1.x checkpoint. `config` is a diffusers folder or hub id giving the
        component configs and tokenizer (offline, pass a local folder)."""
        from diffusers import StableDiffusionPipeline

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: checkpoint not found: {path}")
        if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
            raise ValueError(
                f"path: {path.name} is a pickle checkpoint, which can run arbitrary code when loaded; "
                "convert it to .safetensors or pass allow_pickle=True if you trust it"
            )
        if path.suffix.lower() not in PICKLE_SUFFIXES + (".safetensors",):
            raise ValueError(f"path: expected a .safetensors (or, with allow_pickle, .ckpt) file, got {path.name}")
        try:
            sd = StableDiffusionPipeline.from_single_file(
                str(path), config=str(config), local_files_only=local_files_only,
                safety_checker=None, requires_safety_checker=False,
            )
        except (OSError, EnvironmentError, ValueError, KeyError) as e:
            raise ValueError(f"path: cannot load {path.name} as an SD1.x checkpoint with config {config!r}: {e}") from e
        return cls(sd.unet, sd.vae, sd.text_encoder, sd.tokenizer, sd.scheduler, device=device, dtype=dtype)

    def to(self, device=None, dtype=None) -> "DragonPipeline":
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        for module in (self.unet, self.vae, self.text_encoder):
            param = next(module.parameters())
            if param.device != self.device or param.dtype != self.dtype:  # diffusers warns on no-op casts
                module.to(device=self.device, dtype=self.dtype)
        return self

    # -------------------------------------------------------------------------------------------- encoders

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, 77, C) last hidden states, padded to the tokenizer's max length (SD conditioning)."""
        for k, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt: expected a string, got {type(p).__name__} (prompt #{k})")
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(self.device))[0].float()

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE posterior mean x scaling factor (deterministic, as the official code)."""
        latent = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mean
        return latent.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latent(self, latent: torch.Tensor) -> np.ndarray:
        x = self.vae.decode((latent / self.vae.config.scaling_factor).to(self.dtype), return_dict=False)[0]
        if not torch.isfinite(x).all():
            raise NonFiniteError(f"NaN/Inf in the VAE decode ({self.dtype}); try dtype=torch.float32 for the VAE")
        x = (x.float() / 2 + 0.5).clamp(0, 1)
        return (x[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)

    # ------------------------------------------------------------------------------------------------ tasks

    def move(self, image, mask, offset=(0, 0), scale: float = 1.0, *, prompt: str | None = None,
             reference_region=None, w_edit: float = 4.0, w_content: float = 6.0, w_contrast: float = 0.2,
             w_inpaint: float = 0.8, guidance_scale: float | None = None, energy_scale: float | None = None,
             gradient_coef: float = 0.08, bank_start: int = 5, **options) -> EditResult:
        """Move the masked object by offset=(dx, dy) original-image pixels; scale != 1 also resizes it.

        Official geometry: shift, then scale about the image centre. `reference_region` (optional mask) is what
        the vacated area should come to look like (default: the background). energy_scale is in the demo's
        slider units (x1e3). guidance_scale / energy_scale left as None take the model's recommended settings
        if it ships them (`recommended_settings`), else the official demo's (`OFFICIAL_SETTINGS`)."""
        prep = self._prepare(image, options)
        dx, dy = check_offset(offset)
        scale = check_scale(scale)
        if dx == 0 and dy == 0 and scale == 1:
            raise ValueError("offset=(0, 0) with scale=1 is not an edit; give a displacement or a scale")
        obj = self._mask(mask, "mask", prep)
        region = None if reference_region is None else self._mask(reference_region, "reference_region", prep)
        task = build_move(
            object_mask=obj, reference_region=region, offset_px=(dx, dy), input_scale=prep["input_scale"],
            scale=scale, latent_hw=prep["latent_hw"], w_edit=_check_number(w_edit, "w_edit"),
            w_content=_check_number(w_content, "w_content"), w_contrast=_check_number(w_contrast, "w_contrast"),
            w_inpaint=_check_number(w_inpaint, "w_inpaint"),
            **self._common("move", prep, prompt, None, guidance_scale, energy_scale, gradient_coef,
                           bank_start, 10**9),
        )
        return self._run(task, prep, options)

    def drag(self, image, points, mask, *, prompt: str | None = None, w_edit: float = 4.0, w_content: float = 6.0,
             w_inpaint: float = 0.2, guidance_scale: float | None = None, energy_scale: float | None = None,
             gradient_coef: float = 0.04, bank_start: int = 5, **options) -> EditResult:
        """Drag content: points = [((handle_x, handle_y), (target_x, target_y)), ...] in original pixels, inside
        the editable `mask` (pixels outside it are kept)."""
        prep = self._prepare(image, options)
        if isinstance(points, np.ndarray):
            points = points.tolist()
        if isinstance(points, (str, bytes)) or not isinstance(points, Sequence) or len(points) == 0:
            raise TypeError("points: expected a non-empty list of ((hx, hy), (tx, ty)) pairs")
        editable = self._mask(mask, "mask", prep, levels=1)  # the demo's sketch mask is 0/1
        scaled = []
        for k, pair in enumerate(points):
            if not isinstance(pair, Sequence) or len(pair) != 2:
                raise TypeError(f"points[{k}]: expected a (handle, target) pair of (x, y) points, got {pair!r}")
            handle = io.check_point(pair[0], f"points[{k}] handle", prep["original_hw"])
            target = io.check_point(pair[1], f"points[{k}] target", prep["original_hw"])
            sx, sy = prep["input_scale"]
            scaled.append(((handle[0] * sx, handle[1] * sy), (target[0] * sx, target[1] * sy)))
            tx, ty = min(int(scaled[-1][1][0]), prep["size_hw"][1] - 1), min(int(scaled[-1][1][1]), prep["size_hw"][0] - 1)
            if not editable[ty, tx]:
                raise ValueError(f"points[{k}]: target {tuple(pair[1])} lies outside the editable mask")
        task = build_drag(
            mask=editable, points_scaled=scaled, latent_hw=prep["latent_hw"], w_edit=_check_number(w_edit, "w_edit"),
            w_content=_check_number(w_content, "w_content"), w_inpaint=_check_number(w_inpaint, "w_inpaint"),
            **self._common("drag", prep, prompt, None, guidance_scale, energy_scale, gradient_coef,
                           bank_start, 10**9),
        )
        return self._run(task, prep, options)

    def replace_appearance(self, image, mask, reference, reference_mask, *, prompt: str | None = None,
                           reference_prompt: str | None = None, w_edit: float = 3.5, w_content: float = 5.0,
                           guidance_scale: float | None = None, energy_scale: float | None = None,
                           gradient_coef: float = 0.04,
                           bank_steps: tuple[int, int] = (0, 35), **options) -> EditResult:
        """Give the masked object in `image` the appearance of the masked object in `reference`."""
        prep = self._prepare(image, options)
        obj = self._mask(mask, "mask", prep)
        ref_pixels, ref_mask = self._reference(reference, reference_mask, prep)
        prep["reference_pixels"] = ref_pixels
        task = build_appearance(
            mask=obj, reference_mask=ref_mask, latent_hw=prep["latent_hw"], w_edit=_check_number(w_edit, "w_edit"),
            w_content=_check_number(w_content, "w_content"),
            **self._common("appearance", prep, prompt, reference_prompt, guidance_scale, energy_scale,
                           gradient_coef, *bank_steps),
        )
        return self._run(task, prep, options)

    def paste(self, image, reference, reference_mask, offset=(0, 0), scale: float = 1.0, *,
              prompt: str | None = None,
              reference_prompt: str | None = None, w_edit: float = 4.0, w_content: float = 6.0,
              guidance_scale: float | None = None, energy_scale: float | None = None, gradient_coef: float = 0.04,
              bank_steps: tuple[int, int] = (0, 35), **options) -> EditResult:
        """Paste the masked object of `reference` into `image`, at its reference position shifted by
        offset=(dx, dy) base-image pixels, scaled by `scale` about the image centre (official geometry)."""
        prep = self._prepare(image, options)
        dx, dy = check_offset(offset)
        scale = check_scale(scale, high=4.0)
        ref_pixels, ref_mask = self._reference(reference, reference_mask, prep)
        ref_pixels = scale_about_centre(ref_pixels, scale)  # zero padding = mid-grey in [-1, 1]
        ref_mask = scale_about_centre(ref_mask, scale)
        prep["reference_image"] = ((ref_pixels[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        if not ref_mask.any():
            raise ValueError(f"scale={scale:g} crops the reference object away entirely")
        prep["reference_pixels"] = ref_pixels
        task = build_paste(
            reference_mask=ref_mask, offset_px=(dx, dy), input_scale=prep["input_scale"],
            latent_hw=prep["latent_hw"], w_edit=_check_number(w_edit, "w_edit"),
            w_content=_check_number(w_content, "w_content"),
            **self._common("paste", prep, prompt, reference_prompt, guidance_scale, energy_scale, gradient_coef,
                           *bank_steps),
        )
        return self._run(task, prep, options)

    def invert(self, image, *, prompt: str = "", max_resolution: int = 768, num_inference_steps: int = 50,
               progress: bool = True) -> Inversion:
        """DDIM-invert an image once, for several edits: every task accepts the result in place of its image and
        then skips its inversion (same output as inverting inside the call; `pass_counts` shows the saving).

        Args:
            image: PIL image, HxWx3 uint8 array or path.
            prompt: the inversion prompt; edits of this inversion use it as their prompt.
            max_resolution: working resolution (area about max_resolution², sides multiples of 64).
            num_inference_steps: DDIM steps; edits of this inversion use the same number.
            progress: show a progress bar.
        Returns:
            An `Inversion` holding the working-size image, the inverted latents and the memory bank (CPU-resident
            on CUDA), with its size in bytes (`nbytes`).
        """
        if isinstance(image, Inversion):
            raise TypeError("image: already an Inversion; pass it to an edit method instead")
        prep = self._prepare(image, {"max_resolution": max_resolution})
        if not isinstance(prompt, str):
            raise TypeError(f"prompt: expected a string, got {type(prompt).__name__}")
        schedule = self._schedule(num_inference_steps)
        with _unet_lock(self.unet), tqdm(total=num_inference_steps, desc="dragondiff invert", leave=False,
                                         disable=not progress) as bar:
            latents, bank = self._invert_batch(prep["pixels"], [prompt], schedule, PassCounts(),
                                               self._bank_device({}))
            bar.update(num_inference_steps)
        return Inversion(image=prep["image"], original_hw=prep["original_hw"], max_resolution=max_resolution,
                         prompt=prompt, num_inference_steps=num_inference_steps, latents=latents.cpu(), bank=bank,
                         model_key=id(self.unet), dtype=self.dtype)

    def reconstruct(self, image, *, prompt: str | None = None, use_bank: bool = True, guidance_scale: float = 1.0,
                    **options) -> EditResult:
        """No edit: DDIM inversion, then unguided sampling from z_T (with the memory bank replacing the decoder
        self-attention K/V at every step if use_bank). Measures how faithfully the model inverts an image."""
        prep = self._prepare(image, options)
        h, w = prep["latent_hw"]
        nothing = torch.zeros(1, 1, h, w)
        common = self._common("reconstruct", prep, prompt, None, guidance_scale, 0.0, 0.0,
                              0 if use_bank else 10**9, 10**9)
        task = Task(name="reconstruct", edit_region=nothing, sde_region=nothing, bank_mode=REPLACE, **common)
        return self._run(task, prep, {"sde_strength": 0.0, **options})

    # ------------------------------------------------------------------------------------------- internals

    _OPTIONS = {"preset", "seed", "generator", "num_inference_steps", "max_resolution", "sde_strength",
                "callback_on_step_end", "return_intermediates", "progress", "bank_device"}

    def _prepare(self, image, options) -> dict:
        unknown = set(options) - self._OPTIONS
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {sorted(unknown)}; allowed: {sorted(self._OPTIONS)}")
        if isinstance(image, Inversion):
            return self._prepare_inversion(image, options)
        img = io.load_image(image, "image")
        h, w = img.shape[:2]
        size = io.working_size(h, w, options.get("max_resolution", 768))
        work = io.resize_image(img, size)
        return {
            "original_hw": (h, w),
            "size_hw": size,
            "latent_hw": (size[0] // 8, size[1] // 8),
            # Per axis. The official demo scales x and y by the width ratio, which misplaces points and offsets
            # in y on non-square images (sides are rounded to multiples of 64 separately).
            "input_scale": (size[1] / w, size[0] / h),
            "image": work,
            "pixels": torch.from_numpy(io.to_pixels(work)),
        }

    def _prepare_inversion(self, inv: Inversion, options) -> dict:
        """An edit of an already inverted image: check that it fits this model and these options."""
        if inv.model_key != id(self.unet) or inv.dtype != self.dtype:
            raise ValueError("image: this Inversion was made by another model or dtype; invert with this pipeline")
        for key, value in (("max_resolution", inv.max_resolution), ("num_inference_steps", inv.num_inference_steps)):
            if key in options and options[key] != value:
                raise ValueError(f"{key}={options[key]!r} differs from the inversion's ({value}); leave it out or "
                                 "invert again")
        h, w = inv.original_hw
        size = inv.size_hw
        return {
            "original_hw": (h, w),
            "size_hw": size,
            "latent_hw": (size[0] // 8, size[1] // 8),
            "input_scale": (size[1] / w, size[0] / h),
            "image": inv.image,
            "pixels": torch.from_numpy(io.to_pixels(inv.image)),
            "inversion": inv,
        }

    def _mask(self, mask, name, prep, levels: int = 255) -> torch.Tensor:
        m = io.load_mask(mask, name, prep["original_hw"])
        m = io.resize_mask(m, prep["size_hw"], levels)
        if not m.any():
            raise ValueError(f"{name}: the mask vanishes at the working size {prep['size_hw'][1]}x{prep['size_hw'][0]}")
        return torch.from_numpy(m)

    def _reference(self, reference, reference_mask, prep):
        """Reference image and its mask, stretched to the base image's working size (official: any aspect)."""
        ref = io.load_image(reference, "reference")
        m = io.load_mask(reference_mask, "reference_mask", ref.shape[:2])
        h, w = prep["size_hw"]
        stretched = np.asarray(Image.fromarray(ref).resize((w, h), Image.BICUBIC))
        prep["reference_image"] = stretched
        m = torch.from_numpy(io.resize_mask(m, (h, w)))
        if not m.any():
            raise ValueError("reference_mask: the mask vanishes at the working size")
        return torch.from_numpy(io.to_pixels(stretched)), m

    def _common(self, name, prep, prompt, reference_prompt, guidance_scale, energy_scale, gradient_coef,
                bank_first, bank_last) -> dict:
        inversion = prep.get("inversion")
        if prompt is None:
            prompt = "" if inversion is None else inversion.prompt
        for label, text in (("prompt", prompt), ("reference_prompt", reference_prompt)):
            if text is not None and not isinstance(text, str):
                raise TypeError(f"{label}: expected a string, got {type(text).__name__}")
        if inversion is not None and prompt != inversion.prompt:
            raise ValueError(f"prompt: {prompt!r} differs from the prompt the inversion was made with "
                             f"({inversion.prompt!r}); pass the same prompt (or none) or invert again")
        inversion_prompts = [prompt]
        if "reference_pixels" in prep:
            inversion_prompts.append(prompt if reference_prompt is None else reference_prompt)
        for n, v in (("bank_start / bank_steps", bank_first), ("bank_steps", bank_last)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{n}: expected a non-negative integer step index, got {v!r}")
        pixels = prep["pixels"]
        if "reference_pixels" in prep:
            pixels = torch.cat([pixels, prep["reference_pixels"].to(pixels)])
        prep["settings"] = settings = {}
        for key, value in (("guidance_scale", guidance_scale), ("energy_scale", energy_scale)):
            if value is None:
                source = "model" if key in self.recommended_settings.get(name, {}) else "official"
                value = (self.recommended_settings if source == "model" else OFFICIAL_SETTINGS)[name][key]
            settings[key] = value
        guidance_scale, energy_scale = settings["guidance_scale"], settings["energy_scale"]
        return {
            "pixels": pixels,
            "inversion_prompts": inversion_prompts,
            "prompt": prompt,
            "guidance_scale": _check_number(guidance_scale, "guidance_scale", 0, 50),
            "energy_scale": _check_number(energy_scale, "energy_scale", 0, 100) * 1000.0,
            "gradient_coef": _check_number(gradient_coef, "gradient_coef"),
            "bank_first": int(bank_first),
            "bank_last": int(bank_last),
        }

    def _schedule(self, n) -> Schedule:
        from diffusers import DDIMScheduler

        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= 1000:
            raise ValueError(f"num_inference_steps must be an integer in 1..1000, got {n!r}")
        return Schedule.from_scheduler(DDIMScheduler.from_config(self.scheduler_config), int(n))

    def _bank_device(self, options) -> torch.device:
        return torch.device(options.get("bank_device") or ("cpu" if self.device.type == "cuda" else self.device))

    def _invert_batch(self, pixels, prompts, schedule, counts, bank_device):
        """Inversion of images (B, 3, H, W) into their own bank: (latents (n+1, B, 4, h, w), MemoryBank)."""
        controller = BankController(MemoryBank(bank_device))
        with bank_processors(self.unet, controller):
            z0 = self.encode_image(pixels)
            latents = invert(self.unet, z0, self.encode_prompt(prompts), schedule, controller, counts)
        return latents, controller.bank

    def _run(self, task, prep, options) -> EditResult:
        preset: Preset = get_preset(options.get("preset", "official"))
        inversion = prep.get("inversion")
        n = options.get("num_inference_steps", inversion.num_inference_steps if inversion else 50)
        schedule = self._schedule(n)
        sde = options.get("sde_strength")
        sde = preset.sde_strength if sde is None else _check_number(sde, "sde_strength", 0, 1)
        if sde > 0 and preset.sde_window is None:
            raise ValueError(f"sde_strength={sde:g}: the {preset.name!r} preset has no regional SDE; use 'official'")
        generator = options.get("generator")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator is not None and generator.device.type not in ("cpu", self.device.type):
            raise ValueError(f"generator is on {generator.device}; use a CPU generator or one on {self.device}")
        if generator is None:
            seed = options.get("seed", 42)
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
                raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
            generator = torch.Generator("cpu").manual_seed(int(seed))
        callback = options.get("callback_on_step_end")
        if callback is not None and not callable(callback):
            raise TypeError("callback_on_step_end must be callable(pipeline, step, timestep, {'latents': z})")
        intermediates = bool(options.get("return_intermediates", False))
        bank_device = self._bank_device(options)
        counts = PassCounts()
        stop = {"at": None}

        def step_callback(i, t, z):
            if callback is None:
                return z
            out = callback(self, i, t, {"latents": z}) or {}
            if out.get("interrupt"):
                stop["at"] = i
            if "latents" not in out:
                return z
            new = out["latents"]
            if not isinstance(new, torch.Tensor) or new.shape != z.shape:
                raise TypeError(f"callback_on_step_end must return {{'latents': tensor of shape {tuple(z.shape)}}}, "
                                f"got {type(new).__name__} {tuple(getattr(new, 'shape', ()))}")
            return new.to(z)

        start = time.perf_counter()
        with _unet_lock(self.unet), tqdm(total=2 * n, desc=f"dragondiff {task.name}", leave=False,
                                         disable=not options.get("progress", True)) as bar:
            # All images in one batch; with a reused base inversion, only the reference (if any) is inverted.
            parts = [] if inversion is None else [(inversion.latents.to(self.device), inversion.bank)]
            if task.pixels.shape[0] > len(parts):
                parts.append(self._invert_batch(task.pixels[len(parts):], task.inversion_prompts[len(parts):],
                                                schedule, counts, bank_device))
            bar.update(n)
            inverted = torch.cat([lat for lat, _ in parts], dim=1)
            controller = BankController(merge_banks([bank for _, bank in parts], bank_device),
                                        union_masks=task.union_masks)
            with bank_processors(self.unet, controller):
                z_t, ref_t = task.init_latent(inverted[-1])
                cond, uncond = self.encode_prompt([task.prompt]), self.encode_prompt([""])
                final, rec = sample(
                    self.unet, task, preset, schedule, z_t, inverted, ref_t, cond, uncond, controller, counts,
                    sde_strength=sde, generator=generator, record=intermediates, step_callback=step_callback,
                    progress=bar, should_stop=lambda: stop["at"] is not None,
                )
            pixels = self.decode_latent(final)
        flags = list(task.flags)
        if stop["at"] is not None:
            flags.append(f"interrupted after step {stop['at']} by callback_on_step_end")
        return EditResult(
            image=Image.fromarray(pixels),
            task=task.name,
            preset=preset.name,
            input_image=Image.fromarray(prep["image"]),
            reference_image=Image.fromarray(prep["reference_image"]) if "reference_image" in prep else None,
            masks=task.masks,
            input_scale=prep["input_scale"],
            energies=rec.energies,
            pass_counts=counts.as_dict(),
            flags=flags,
            settings=prep.get("settings", {}),
            seconds=time.perf_counter() - start,
            inverted_latents=inverted.cpu() if intermediates else None,
            z_T=z_t.cpu() if intermediates else None,
            latents=torch.stack(rec.latents).cpu() if intermediates else None,
            guidance=[(i, r, g.cpu()) for i, r, g in rec.guidance] if intermediates else None,
            eps_cfg=[(i, r, e.cpu()) for i, r, e in rec.eps_cfg] if intermediates else None,
        )


def check_settings(settings: dict, name: str) -> dict:
    """Validate a recommended-settings table: {task: {"guidance_scale": x, "energy_scale": y}}."""
    if not isinstance(settings, dict):
        raise TypeError(f"{name}: expected a dict of task -> settings, got {type(settings).__name__}")
    out = {}
    for task, values in settings.items():
        if task not in OFFICIAL_SETTINGS:
            raise ValueError(f"{name}: unknown task {task!r}; allowed: {sorted(OFFICIAL_SETTINGS)}")
        if not isinstance(values, dict) or not set(values) <= {"guidance_scale", "energy_scale"}:
            raise ValueError(f"{name}[{task!r}]: expected a dict with guidance_scale and/or energy_scale, got {values!r}")
        out[task] = {k: _check_number(v, f"{name}[{task!r}][{k!r}]", 0, 100) for k, v in values.items()}
    return out


def read_settings(folder) -> dict:
    """The model's recommended settings from SETTINGS_FILE in a local model folder ({} when there is none)."""
    import json

    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return check_settings(data.get("settings", {}), str(path))

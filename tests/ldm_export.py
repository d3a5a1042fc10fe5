"""Write diffusers/transformers SD1.x components as an original LDM (CompVis) single-file checkpoint.

Test helper: it lets us build a tiny, random, SD-shaped `.safetensors` file offline so that
`from_single_file` code paths can be exercised without downloading a real checkpoint.
The key layout is the inverse of diffusers' own conversion
(`diffusers.loaders.single_file_utils.convert_ldm_{unet,vae,clip}_checkpoint`), so a file written
here is converted back by diffusers into exactly the original tensors.

Run `HF_HUB_OFFLINE=1 python tests/ldm_export.py` to self-check the round trip on tests/data/tiny-model.
"""

import re

import torch
from safetensors.torch import save_file

# ResBlock sub-module names: diffusers ResnetBlock2D -> LDM ResBlock (Sequential indices).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled-text + time-id embedding
    "add_embedding.linear_2": "label_emb.0.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# VAE mid-block attention: diffusers Attention -> LDM AttnBlock.
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_head(rest, table):
    """Rename the leading module path of `rest` ("<module>.<param>") via `table`."""
    module, param = rest.rsplit(".", 1)
    return f"{table.get(module, module)}.{param}"


def _unet_key(key, cfg):
    # LDM numbers input/output blocks flat; diffusers' converter assumes a stride of
    # layers_per_block + 1 per resolution (resnets + one downsample/upsample slot).
    lpb = cfg.layers_per_block
    if not isinstance(lpb, int):
        raise ValueError("per-block layers_per_block has no SD1.x LDM layout")
    stride = lpb + 1
    module, param = key.rsplit(".", 1)
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{param}"

    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        kind, b, sub, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if kind == "down_blocks":
            if sub == "downsamplers":  # sits in the slot after the block's resnets
                return f"input_blocks.{1 + b * stride + lpb}.0.op.{rest.removeprefix('conv.')}"
            idx = 1 + b * stride + j  # +1: input_blocks.0 is conv_in
            pos = 0 if sub == "resnets" else 1
            return f"input_blocks.{idx}.{pos}.{_rename_head(rest, _UNET_RESNET) if pos == 0 else rest}"
        if sub == "upsamplers":
            # Upsample follows the attention in cross-attn blocks, else directly the resnet.
            has_attn = "CrossAttn" in cfg.up_block_types[b]
            return f"output_blocks.{b * stride + lpb}.{2 if has_attn else 1}.{rest}"
        idx = b * stride + j
        if sub == "resnets":
            return f"output_blocks.{idx}.0.{_rename_head(rest, _UNET_RESNET)}"
        return f"output_blocks.{idx}.1.{rest}"

    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        # LDM middle_block is [ResBlock, SpatialTransformer, ResBlock].
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{2 * int(m[2])}.{_rename_head(m[3], _UNET_RESNET)}"
    raise KeyError(f"no LDM mapping for UNet key {key!r}")


def _vae_key(key, cfg):
    module, param = key.rsplit(".", 1)
    if module in ("quant_conv", "post_quant_conv") or module.endswith((".conv_in", ".conv_out")):
        return key
    if module.endswith(".conv_norm_out"):
        return module.replace("conv_norm_out", "norm_out") + "." + param

    n_up = len(cfg.up_block_types)
    m = re.match(r"(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\.(.+)", key)
    if not m:
        raise KeyError(f"no LDM mapping for VAE key {key!r}")
    part, kind, rest = m[1], m[2], m[3]
    if kind == "mid_block":
        r = re.match(r"(resnets|attentions)\.(\d+)\.(.+)", rest)
        if r[1] == "attentions":
            return f"{part}.mid.attn_1.{_rename_head(r[3], _VAE_ATTN)}"
        return f"{part}.mid.block_{int(r[2]) + 1}.{r[3].replace('conv_shortcut', 'nin_shortcut')}"
    r = re.match(r"(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest)
    b, sub, j, tail = int(r[1]), r[2], int(r[3]), r[4]
    # LDM decoder `up` is indexed from the highest resolution, diffusers' up_blocks from the lowest.
    ldm_b = b if kind == "down_blocks" else n_up - 1 - b
    name = "down" if kind == "down_blocks" else "up"
    if sub == "resnets":
        return f"{part}.{name}.{ldm_b}.block.{j}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
    return f"{part}.{name}.{ldm_b}.{'downsample' if sub == 'downsamplers' else 'upsample'}.{tail}"


# transformers CLIP text layer -> OpenCLIP resblock (SD2's and SDXL's second text encoder).
_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding",
                  "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def _open_clip_state(text_encoder) -> dict:
    """A transformers CLIP text model's weights under OpenCLIP's names (q/k/v fused into in_proj)."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {}
    for key, tensor in sd.items():
        if key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = tensor
        elif key == "text_projection.weight":
            out["text_projection"] = tensor.T  # OpenCLIP multiplies x @ P
        elif key.startswith("encoder.layers."):
            i, rest = re.match(r"encoder\.layers\.(\d+)\.(.+)", key).groups()
            module, param = rest.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if module.endswith("q_proj"):
                    parts = [sd[f"encoder.layers.{i}.self_attn.{p}_proj.{param}"] for p in "qkv"]
                    out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat(parts)
                continue
            out[f"transformer.resblocks.{i}.{_OPEN_CLIP_LAYER[module]}.{param}"] = tensor
        elif not key.endswith("position_ids"):
            raise KeyError(f"no OpenCLIP mapping for text encoder key {key!r}")
    return out


def export_ldm_checkpoint(unet, vae, text_encoder, path, *, text_encoder_2=None, open_clip: bool = False) -> None:
    """SD1.x (CLIP text), SD2.x (`open_clip`: OpenCLIP text under cond_stage_model.model.) or SDXL
    (`text_encoder_2`: CLIP under conditioner.embedders.0, OpenCLIP bigG under conditioner.embedders.1)."""
    out = {}

    def put(key, tensor):
        if key in out:
            raise KeyError(f"two tensors map to LDM key {key!r}")
        # safetensors refuses views/shared storage; clone to own contiguous memory.
        out[key] = tensor.detach().contiguous().clone()

    for k, t in unet.state_dict().items():
        put("model.diffusion_model." + _unet_key(k, unet.config), t)

    for k, t in vae.state_dict().items():
        ldm = _vae_key(k, vae.config)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and t.ndim == 2:
            t = t[:, :, None, None]  # LDM AttnBlock uses 1x1 convs; diffusers squeezes them to Linear
        put("first_stage_model." + ldm, t)

    if open_clip:
        for k, t in _open_clip_state(text_encoder).items():
            put("cond_stage_model.model." + k, t)
    else:
        # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` submodule), but the LDM file and
        # diffusers' CLIP detection (`...transformer.text_model.embeddings...`) still expect that prefix.
        prefix = "conditioner.embedders.0.transformer." if text_encoder_2 is not None else "cond_stage_model.transformer."
        for k, t in text_encoder.state_dict().items():
            if not k.startswith("text_model."):
                k = "text_model." + k
            put(prefix + k, t)
    if text_encoder_2 is not None:
        for k, t in _open_clip_state(text_encoder_2).items():
            put("conditioner.embedders.1.model." + k, t)

    save_file(out, str(path))


if __name__ == "__main__":
    import copy
    import os
    import tempfile
    from pathlib import Path

    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    model_dir = str(Path(__file__).parent / "data" / "tiny-model")
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    te = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "tiny-ldm.safetensors")
        export_ldm_checkpoint(unet, vae, te, ckpt)
        # `config=<local diffusers folder>` makes every component config (incl. the CLIP one) come
        # from that folder; `local_files_only=True` stops any hub lookup.
        pipe = StableDiffusionPipeline.from_single_file(ckpt, config=model_dir, local_files_only=True)

    worst = 0.0
    for name, orig, new in [("unet", unet, pipe.unet), ("vae", vae, pipe.vae), ("text_encoder", te, pipe.text_encoder)]:
        a, b = orig.state_dict(), new.state_dict()
        assert a.keys() == b.keys(), f"{name}: key sets differ"
        for k in a:
            assert a[k].shape == b[k].shape, f"{name}.{k}: {a[k].shape} vs {b[k].shape}"
            worst = max(worst, (a[k] - b[k]).abs().max().item())
            assert torch.equal(a[k], b[k]), f"{name}.{k} differs"
        print(f"{name}: {len(a)} tensors identical")

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, 16, 16, generator=g)
    ctx = torch.randn(1, 7, unet.config.cross_attention_dim, generator=g)
    # Reference runs on a deepcopy: from_pretrained leaves weights at unaligned mmap addresses, and CPU
    # kernels then pick a different summation order (~1e-6 drift) even though the weights are bitwise equal.
    with torch.no_grad():
        y0 = copy.deepcopy(unet)(x, 10, encoder_hidden_states=ctx).sample
        y1 = pipe.unet(x, 10, encoder_hidden_states=ctx).sample
    assert torch.equal(y0, y1), "UNet forward differs"
    print(f"max abs param diff {worst}; UNet forward identical")

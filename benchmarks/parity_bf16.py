"""The official-code parity runs (tests/data/parity) re-run with the model in bf16: how far bf16 takes the engine from
the official fp32 trajectory (docs/speed.md). Run from the repository root: python benchmarks/parity_bf16.py [out.json]."""
import sys, json, numpy as np, torch
sys.path.insert(0, "tests")
torch.set_num_threads(2)
from conftest import PARITY, TINY_MODEL
from test_parity import run_config, rel
from dragondiff import DragonPipeline
out = {}
for name in ("P-move", "P-drag"):
    ref = np.load(PARITY / f"{name}.npz")
    pipe = DragonPipeline.from_pretrained(TINY_MODEL, local_files_only=True, device="cpu", dtype=torch.bfloat16)
    o = run_config(pipe, name)
    diff = np.abs(np.asarray(o.image).astype(int) - ref["final_image"].astype(int))
    eps = np.stack([e.float().numpy() for _, _, e in o.eps_cfg])
    row = {"inversion_rel": float(rel(o.inverted_latents.float(), ref["inv_latents"])),
           "eps_cfg_rel_max": float(max(rel(eps[i], ref["eps_cfg_all"][i]) for i in range(50))),
           "final_latent_rel": float(rel(o.latents[-1].float(), ref["final_latent"])),
           "image_max_grey": int(diff.max()), "image_within_1_grey": float((diff <= 1).mean()),
           "image_mean_grey": float(diff.mean())}
    out[name] = row
    print(name, row)
json.dump(out, open(sys.argv[1] if len(sys.argv) > 1 else "parity_bf16.json", "w"), indent=1)

"""The README.md of an export folder / Hub repo: what was trained (base, attention, clips, steps, data) and how
to load it in diffusers, ComfyUI and this project's sampler with the same sparse attention."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Optional

from train.checkpointing import COMFYUI_FILE, LORA_FILE, Checkpoint
from train.models import get_adapter



def _is_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name or "")) and not Path(name).exists()


def model_card(ckpt: Checkpoint, files: Mapping[str, bool], repo_id: Optional[str] = None, local: Optional[Path] = None) -> str:
    """README.md for the export folder / Hub repo: what was trained and how to load it."""
    meta = ckpt.meta
    family, base = ckpt.family, str(meta["pretrained"])
    att = meta.get("attention") or {}
    data = meta.get("data") or {}
    train = meta.get("train") or {}
    lora = meta.get("lora") or {}
    adapter = get_adapter(family)
    pipe_cls, tr_cls = adapter.pipeline_class, adapter.transformer_class
    att_type = str(att.get("type", "dense"))
    where = repo_id or str(local or "<this folder>")
    tags = ["text-to-video", "diffusers", family, "longvideo-sparse-ft", f"{att_type}-attention"]
    if files.get("diffusers") or files.get("comfyui"):
        tags.append("lora")
    front = ["---", "library_name: diffusers", "pipeline_tag: text-to-video"]
    if _is_hub_id(base):
        front.append(f"base_model: {base}")
    front.append("tags:")
    front += [f"- {t}" for t in tags]
    front.append("---")

    if att_type == "radial":
        sink = att.get("attention_sink")
        att_params = f"decay_factor={att.get('decay_factor')}, attention_sink={'family default' if sink is None else sink}"
    elif att_type == "svg2":
        att_params = (f"num_q_clusters={att.get('num_q_clusters')}, num_k_clusters={att.get('num_k_clusters')}, "
                      f"top_p={att.get('top_p')}, min_kc_ratio={att.get('min_kc_ratio')}")
    else:
        att_params = "-"
    frames, height, width = data.get("frames"), data.get("height"), data.get("width")
    rows = [
        ("base model", f"`{base}`" + (f" (revision `{meta['revision']}`)" if meta.get("revision") else "")),
        ("family", family),
        ("training", "LoRA" if ckpt.mode == "lora" else "full fine-tune"),
    ]
    if ckpt.mode == "lora":
        rows.append(("LoRA", f"rank {lora.get('rank')}, alpha {lora.get('alpha')}, targets {', '.join(map(str, lora.get('target_modules') or []))}"))
    rows += [
        ("attention", f"{att_type} (block size {att.get('block_size')}, first {att.get('dense_layers', 0)} blocks dense; {att_params})"),
        ("clips", f"{frames} frames, {height}x{width}, {data.get('fps')} fps"),
        ("steps", f"{meta.get('step')} of {train.get('max_steps')} (lr {train.get('learning_rate')}, batch {train.get('batch_size')} x {meta.get('world_size', 1)} GPU(s), ZeRO stage {meta.get('zero_stage', 0)})"),
        ("dataset", f"`{data.get('path')}`"),
    ]
    if meta.get("ema"):
        rows.append(("weights", "EMA of the trained weights"))

    lines = front + [
        "",
        f"# {adapter.release_name} long-video fine-tune with {att_type} attention",
        "",
        f"Fine-tuned from `{base}` with longvideo-sparse-ft on {frames}-frame clips "
        f"at {height}x{width}, with {att_type} block-sparse attention in the video self-attention.",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Files", ""]
    if files.get("diffusers"):
        lines.append(f"- `{LORA_FILE}`: LoRA for diffusers (`{pipe_cls}.load_lora_weights`); the LoRA config is in the "
                     "`lora_adapter_metadata` header.")
    if files.get("comfyui"):
        lines.append(f"- `{COMFYUI_FILE}`: the same LoRA with original module names (`diffusion_model.` prefix, alpha/rank "
                     "baked into the weights) for ComfyUI: copy it to `ComfyUI/models/loras/` and load it at strength 1.0.")
    if files.get("transformer"):
        lines.append(f"- `transformer/`: the {'merged (base + LoRA)' if ckpt.mode == 'lora' else 'fine-tuned'} transformer "
                     f"in diffusers layout (`{tr_cls}.from_pretrained(..., subfolder=\"transformer\")`).")
    lines.append("- `training_config.yaml`, `training_meta.json`: the resolved training recipe and checkpoint facts.")
    lines += ["", "## Use with diffusers", "", "```python", "import torch", f"from diffusers import {pipe_cls}"
              + (f", {tr_cls}" if files.get("transformer") else ""), ""]
    if files.get("transformer"):
        lines += [f'transformer = {tr_cls}.from_pretrained("{where}", subfolder="transformer", dtype=torch.bfloat16)',
                  f'pipe = {pipe_cls}.from_pretrained("{base}", transformer=transformer, dtype=torch.bfloat16)']
        if files.get("diffusers"):
            lines += [f'# or the base model plus the LoRA file: {pipe_cls}.from_pretrained("{base}", ...).load_lora_weights("{where}")']
    else:
        lines += [f'pipe = {pipe_cls}.from_pretrained("{base}", dtype=torch.bfloat16)',
                  f'pipe.load_lora_weights("{where}")']
    lines += ['pipe.to("cuda")',
              f'video = pipe(prompt="...", num_frames={frames}, height={height}, width={width}).frames[0]',
              "```", "",
              "Plain diffusers attention is dense. The weights were trained for "
              f"{att_type} attention; to generate with the same sparse attention, use this project's sampler:", "",
              "```bash"]
    if ckpt.mode == "lora" and (files.get("diffusers") or files.get("comfyui")):
        weights_arg, weights_kw = f" --lora {where}", f', lora="{where}"'
    elif files.get("transformer"):
        weights_arg, weights_kw = f" --transformer {where}", f', transformer="{where}"'
    else:
        weights_arg, weights_kw = "", ""
    dense = f" --dense-layers {att.get('dense_layers', 0)}" if att.get("dense_layers") else ""
    if att_type == "radial":
        extra = f" --decay-factor {att.get('decay_factor')}"
        if att.get("attention_sink") is not None:
            extra += f" --attention-sink {str(att.get('attention_sink')).lower()}"
    elif att_type == "svg2":
        extra = (f" --num-q-clusters {att.get('num_q_clusters')} --num-k-clusters {att.get('num_k_clusters')}"
                 f" --top-p {att.get('top_p')} --min-kc-ratio {att.get('min_kc_ratio')}")
    else:
        extra = ""
    py_att = f'type="{att_type}", block_size={att.get("block_size")}, dense_layers={att.get("dense_layers", 0)}'
    if att_type == "radial":
        py_att += f", decay_factor={att.get('decay_factor')}"
    elif att_type == "svg2":
        py_att += f", top_p={att.get('top_p')}"
    lines += [f'python train/sample.py --model {base}{weights_arg} --attention {att_type}{extra}{dense} '
              f'--block-size {att.get("block_size")} --frames {frames} --height {height} --width {width} '
              '--prompt "..." --out video.mp4',
              "```", "",
              "`--dense-steps N` keeps the first N denoising steps dense (as the Radial Attention paper does at inference); "
              "the sampler prints the time per step and the attention density. From Python:", "",
              "```python", "from train.sampling import AttentionConfig, SampleOptions, generate", "",
              f'generate(SampleOptions(model="{base}"{weights_kw}, prompt="...", frames={frames}, height={height}, width={width},',
              f'                       attention=AttentionConfig({py_att}), out="video.mp4"))',
              "```", ""]
    return "\n".join(lines)

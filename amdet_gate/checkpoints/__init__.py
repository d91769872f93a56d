"""Text encoders as people download them: single-file checkpoints (SD 1.x/2.x, SDXL, SD 3, Flux), ComfyUI
and OpenCLIP text-encoder files, the encoders of a diffusers pipeline, and LoRA adapters over them.

  parts.py, layouts/   what a file holds, recognised from its safetensors header (layouts() lists the layouts)
  tower.py, openclip.py  an encoder's tensors under transformers' names (OpenCLIP's converted)
  families.py          the config it is built with: shipped (CLIP-L, OpenCLIP-H, bigG), inferred, --config
  load.py, loader.py   reading only that encoder's tensors; the LoRA merge (lora.py); the layer (layer.py);
                       loader.load is the one entry point the scanner loads any resolved model through
  inventory.py, attach.py  which encoders a scan runs; attach layers them over the model sources (sources/)
  summary.py           the lines each report adds on the encoder and layer (the reports: amdet_gate/report)

Layers: this package sits over amdet_gate/sources (which encoder of a resolved model) and
amdet_gate/encoders (every tower here is a CLIP one, built by the CLIP family, encoders/clip.py).

The user-facing description, one command per source, is docs/sources.md.
"""

"""The lines every report adds about which encoder was scanned and what was not (the reports of a model
with several text encoders, which multiscan.py runs, are each report format's: amdet_gate/report).

Every string from result.json is untrusted (a file can be named anything, a layout title quotes
it): Markdown goes through `md_text`, HTML through Jinja2's autoescape.
"""

from __future__ import annotations

from amdet_gate.result import ModelIdentity
from amdet_gate.sanitise import md_text


def encoder_lines(model: ModelIdentity) -> list[tuple[str, str]]:
    """(label, text) rows for one encoder's report: which encoder, which layer, which config, the LoRA,
    and every part of the model that was not scanned. Empty for a plain encoder folder."""
    details = model.details
    if details is None:
        return []
    rows = []
    if details.encoder or details.layout:
        where = details.layout_title or details.layout or ""
        rows.append(("Encoder", f"{details.encoder or 'the model'}" + (f" ({where})" if where else "")))
    layer = details.layer
    scanned = "the final layer (after the final LayerNorm)" if layer.scanned == "final" else \
        f"hidden_states[{layer.scanned}] (no final LayerNorm)"
    by, reads = layer.chosen_by, layer.consumer_reads
    why = "set by --layer" if by == "--layer" else "the default" if by == "default" else f"what {by} reads"
    rows.append(("Layer", f"{scanned}, {why}" + (f" (the pipeline reads {reads}; --layer consumer scans it)"
                                                  if reads is not None else "")
                 + (f"; {details.consumer}" if details.consumer else "")))
    if details.config_source is not None and details.config_source.note:
        rows.append(("Config", details.config_source.note))
    lora = details.lora
    if lora is not None:
        rows.append(("LoRA", f"{lora.file} ({lora.format}, scale {lora.scale}, "
                     f"{lora.modules_merged} layers merged into this encoder)"))
    rows += [("Not scanned", f"{part.name} ({part.kind}): {part.reason}") for part in details.not_scanned]
    return rows


def encoder_markdown(model: ModelIdentity) -> list[str]:
    return [line for label, text in encoder_lines(model) for line in (f"**{label}** {md_text(text, 400)}", "")]

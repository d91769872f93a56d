"""The typed scan result: frozen dataclasses for everything result.json holds, one `dump` and one
validating `load`, and the JSON Schema they share (schemas/result.schema.json).

    enums.py     the closed sets of words (verdict, stop reason, objective)
    identity.py  the tool, the model's and the anchor's identity
    measures.py  settings, prompts, the gate table, the searches, distributions, landscape, timings
    target.py    the reversed target and what the renderers drew
    policy.py    the policy's decision and its record
    document.py  ScanResult, dump / load, the schema
    codec.py     the one walk over the types that writes, reads and describes them
"""

from amdet_gate.result.codec import ResultError
from amdet_gate.result.document import (
    SCHEMA_VERSION,
    ScanResult,
    dump,
    dumps,
    from_dict,
    load,
    result_schema,
)
from amdet_gate.result.enums import Objective, StopReason, Verdict
from amdet_gate.result.identity import (
    ConfigSource,
    EncoderDetails,
    LayerInfo,
    LoraInfo,
    ModelIdentity,
    Tool,
    UnscannedPart,
    WeightFileRecord,
)
from amdet_gate.result.measures import (
    Check,
    Confirmation,
    Distributions,
    Environment,
    Gate,
    GateTable,
    Landscape,
    Natural,
    PooledSearch,
    Prompts,
    Search,
    Settings,
    Timings,
)
from amdet_gate.result.policy import AllowedBy, PolicyDecision, PolicyRecord
from amdet_gate.result.target import Image, NearPrompt, NearToken, RenderingRecord, ReversedTarget

__all__ = [
    "SCHEMA_VERSION", "AllowedBy", "Check", "ConfigSource", "Confirmation", "Distributions", "EncoderDetails",
    "Environment", "Gate", "GateTable", "Image", "Landscape", "LayerInfo", "LoraInfo", "ModelIdentity", "Natural",
    "NearPrompt", "NearToken", "Objective", "PolicyDecision", "PolicyRecord", "PooledSearch", "Prompts",
    "RenderingRecord", "ResultError", "ReversedTarget", "ScanResult", "Search", "Settings", "StopReason", "Timings",
    "Tool", "UnscannedPart", "Verdict", "WeightFileRecord", "dump", "dumps", "from_dict", "load", "result_schema",
]

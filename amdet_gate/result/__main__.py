"""`python -m amdet_gate.result`: print the JSON Schema the result types describe (the shipped
schemas/result.schema.json must equal it; tests/test_result.py checks)."""

import json

from amdet_gate.result import result_schema

print(json.dumps(result_schema(), indent=2))

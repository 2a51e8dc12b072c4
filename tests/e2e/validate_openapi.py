"""Validates the OpenAPI document on stdin with openapi-spec-validator (from PyPI); prints the
document's paths as JSON. Exits non-zero, with the validator's error, if it is not valid."""
import json
import sys

from openapi_spec_validator import validate

document = json.load(sys.stdin)
validate(document)
json.dump(sorted(document["paths"]), sys.stdout)

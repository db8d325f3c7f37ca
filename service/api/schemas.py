"""The fixed schemas of the OpenAPI document: the error body, a prediction, and the Open
Inference Protocol's request and error. ``service.api.openapi`` adds the per-model inputs."""

from __future__ import annotations

from service.decision import SET_KINDS

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}

PREDICTION = {
    "type": "object",
    "required": [
        "request_id",
        "model",
        "label",
        "label_rule",
        "probabilities",
        "modalities",
        "warnings",
    ],
    "properties": {
        "request_id": {"type": "string"},
        "model": {
            "type": "object",
            "required": ["name", "version"],
            "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
        },
        "label": {"type": "string"},
        "label_rule": {
            "type": "string",
            "enum": ["argmax", "balanced"],
            "description": "argmax: the most probable class; balanced: the most probable "
            "relative to its share of the training data",
        },
        "probabilities": {
            "type": "object",
            "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "prediction_set": {"type": "array", "items": {"type": "string"}},
        "coverage": {"type": "number"},
        "sets": {"type": "string", "enum": list(SET_KINDS)},
        "refer": {"type": "boolean"},
        "reason": {"type": ["string", "null"]},
        "ood": {
            "type": "object",
            "properties": {
                "score": {"type": "number"},
                "flagged": {"type": "boolean"},
                "val_flagged": {
                    "type": "object",
                    "description": "of the val inputs given this label, how many the flag marked",
                },
            },
        },
        "modalities": {"type": "object"},
        "warnings": {"type": "array", "items": {"type": "string"}},
        "batch_size": {"type": "integer"},
        "timing_ms": {"type": "object", "additionalProperties": {"type": "number"}},
    },
}

PROTOCOL_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}
_TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": ["BYTES", "UINT8", "FP32"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "data": {"type": "array", "description": "row-major values; BYTES as base64 strings"},
        "parameters": {
            "type": "object",
            "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
        },
    },
}
INFER_REQUEST = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": {
                    "type": "object",
                    "properties": {
                        "timeout": {"type": "integer", "description": "microseconds"},
                        "coverage": {"type": "number"},
                        "sets": {"type": "string", "enum": list(SET_KINDS)},
                        "binary_data_output": {"type": "boolean"},
                    },
                },
                "inputs": {"type": "array", "items": _TENSOR},
                "outputs": {"type": "array", "items": {"type": "object"}},
            },
        }
    },
    "application/octet-stream": {
        "schema": {"type": "string", "format": "binary"},
        "description": "binary tensor data extension: a JSON header of "
        "Inference-Header-Content-Length bytes, then each input's bytes in order",
    },
}

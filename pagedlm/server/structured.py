"""The request fields that constrain output, mapped to one ``StructuredOutputsParams``.

OpenAI's ``response_format`` (``text`` / ``json_object`` / ``json_schema``) and vLLM's
``structured_outputs`` object and older ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
``guided_grammar`` fields. At most one of them may constrain a request; a schema or regex that
does not compile is a 400 naming the field it came from.
"""

from __future__ import annotations

from typing import Any

from pagedlm.sampling_params import StructuredOutputsParams
from pagedlm.server import protocol as P

GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}


class StructuredFieldError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _from_response_format(rf: P.ResponseFormat) -> dict[str, Any] | None:
    if rf.type == "text":
        return None
    if rf.type == "json_object":
        return {"json_object": True}
    schema = dict(rf.json_schema.schema_)
    if not rf.json_schema.strict:
        # Non-strict: keywords the grammar compiler does not implement are ignored, not refused.
        schema["x-guidance"] = {**schema.get("x-guidance", {}), "lenient": True}
    return {"json": schema}


def structured_params(req: P._SamplingFields) -> StructuredOutputsParams | None:
    """The one constraint a request asks for (None for free text)."""
    found: list[tuple[str, dict[str, Any]]] = []
    if req.response_format is not None:
        spec = _from_response_format(req.response_format)
        if spec is not None:
            found.append(("response_format", spec))
    if req.structured_outputs is not None:
        found.append(("structured_outputs", dict(req.structured_outputs)))
    for field, key in GUIDED_FIELDS.items():
        value = getattr(req, field)
        if value is not None:
            found.append((field, {key: value}))
    if not found:
        return None
    if len(found) > 1:
        names = [f for f, _ in found]
        raise StructuredFieldError(names[1], f"{' and '.join(names)} both constrain the output; give only one")
    field, spec = found[0]
    try:
        return StructuredOutputsParams.coerce(spec)
    except (ValueError, TypeError) as e:
        raise StructuredFieldError(field, f"{field}: {e}") from e

"""Schemas and regexes the structured-output tests and the grammar benchmark share.

Every string is bounded (maxLength / pattern), every array has maxItems and numbers are
bounded or integers, so a random model's walk through the grammar ends well within the
token budgets the tests use: what is checked is that the output obeys the schema, not that a
tiny model can write JSON on its own.
"""

from __future__ import annotations

S = {"type": "string", "maxLength": 8}  # a short string, the building block of most schemas

SCHEMAS: dict[str, dict] = {
    "flat_object": {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0,
                                                                        "maximum": 120}},
                    "required": ["name", "age"], "additionalProperties": False},
    "nested_object": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                                  "tag": S},
                 "required": ["id", "tag"], "additionalProperties": False},
        "ok": {"type": "boolean"}}, "required": ["user", "ok"], "additionalProperties": False},
    "deep_nesting": {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "object", "properties": {"c": {"type": "integer", "minimum": -5, "maximum": 5}},
              "required": ["c"], "additionalProperties": False}}, "required": ["b"], "additionalProperties": False}},
                     "required": ["a"], "additionalProperties": False},
    "array_of_ints": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                      "minItems": 1, "maxItems": 5},
    "array_of_objects": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"k": S, "v": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["k", "v"], "additionalProperties": False}},
    "enum_string": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
                    "required": ["color"], "additionalProperties": False},
    "enum_mixed": {"enum": ["yes", "no", 1, 2, None, True]},
    "const": {"type": "object", "properties": {"version": {"const": 3}, "kind": {"const": "v"}},
              "required": ["version", "kind"], "additionalProperties": False},
    "int_bounds": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 20},
                                                    "m": {"type": "integer", "exclusiveMinimum": -3,
                                                          "exclusiveMaximum": 3}},
                   "required": ["n", "m"], "additionalProperties": False},
    # multipleOf bounds the digits too: a bare bounded number lets greedy decoding write 1.000000...
    "number_bounds": {"type": "object", "properties": {"x": {"type": "number", "minimum": -1, "maximum": 1,
                                                             "multipleOf": 0.25}},
                      "required": ["x"], "additionalProperties": False},
    "boolean_and_null": {"type": "object", "properties": {"b": {"type": "boolean"}, "z": {"type": "null"}},
                         "required": ["b", "z"], "additionalProperties": False},
    "optional_fields": {"type": "object", "properties": {"req": S, "opt": {"type": "integer", "minimum": 0,
                                                                            "maximum": 3}},
                        "required": ["req"], "additionalProperties": False},
    "string_pattern": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                       "required": ["zip"], "additionalProperties": False},
    "string_length": {"type": "object", "properties": {"code": {"type": "string", "minLength": 2,
                                                                 "maxLength": 4}},
                      "required": ["code"], "additionalProperties": False},
    "date_like": {"type": "object", "properties": {"date": {"type": "string",
                                                            "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
                  "required": ["date"], "additionalProperties": False},
    "any_of": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 3}]},
    "one_of_objects": {"oneOf": [
        {"type": "object", "properties": {"cat": {"const": "meow"}}, "required": ["cat"], "additionalProperties": False},
        {"type": "object", "properties": {"dog": {"const": "woof"}}, "required": ["dog"],
         "additionalProperties": False}]},
    "refs": {"type": "object", "$defs": {"pt": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}},
             "properties": {"from": {"$ref": "#/$defs/pt"}, "to": {"$ref": "#/$defs/pt"}},
             "required": ["from", "to"], "additionalProperties": False},
    "tuple_prefix_items": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                            {"type": "boolean"}], "items": False},
    "array_of_enums": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 4},
    "nested_arrays": {"type": "array", "maxItems": 2, "items": {"type": "array", "maxItems": 2,
                                                                 "items": {"type": "integer", "minimum": 0,
                                                                           "maximum": 5}}},
    "tool_args": {"type": "object", "properties": {
        "location": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                  "required": ["location", "unit", "days"], "additionalProperties": False},
}

# (regex, a Python fullmatch pattern of the same language)
REGEXES: dict[str, str] = {
    "phone": r"\(\d{3}\) \d{3}-\d{4}",
    "ipv4": r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)",
    "word_list": r"[a-z]{1,6}(, [a-z]{1,6}){0,3}",
    "hex_color": r"#[0-9a-f]{6}",
}

CHOICES = ["Positive", "Negative", "Neutral"]

"""`rpc.discover`: the OpenRPC 1.3 document of the JSON-RPC surface, generated from the registry.

Each method lists its params in C order when it mirrors a C function (`paramStructure: either`: an array
in that order, or an object by name; server-owned slots are `null`), else by name. Schemas are the params
and result models' JSON Schemas (2020-12) with their shared definitions under `components/schemas`; the
errors are the error table's rows under `components/errors`.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from mcp_rkllm import __version__
from mcp_rkllm.errors import ERRORS
from mcp_rkllm.surfaces.jsonrpc.protocol import CALLBACK_METHOD, INVALID_PARAMS, method_name

if TYPE_CHECKING:
    from mcp_rkllm.surfaces.jsonrpc.protocol import Dispatcher
    from mcp_rkllm.surfaces.registry import OperationSpec, Registry

OPENRPC_VERSION = "1.3.2"

_NULL_SLOT = {"type": "null", "description": "Owned by the server (out-parameter, callback or userdata): pass null."}


def _relocated(schema: Any) -> Any:
    """`schema` with its `#/$defs/X` references pointing at `#/components/schemas/X`."""
    if isinstance(schema, dict):
        return {k: ("#/components/schemas/" + v.removeprefix("#/$defs/") if k == "$ref" and isinstance(v, str)
                    else _relocated(v)) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_relocated(v) for v in schema]
    return schema


def _schema(model: type[BaseModel], mode: str, shared: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(mode=mode)  # type: ignore[arg-type]
    for name, definition in schema.pop("$defs", {}).items():
        shared.setdefault(name, _relocated(definition))
    return _relocated(schema)  # type: ignore[no-any-return]


def _method(spec: OperationSpec, shared: dict[str, Any]) -> dict[str, Any]:
    params_schema = _schema(spec.params, "validation", shared)
    properties: dict[str, Any] = params_schema.get("properties", {})
    required = set(params_schema.get("required", []))

    def descriptor(name: str, schema: dict[str, Any], is_required: bool) -> dict[str, Any]:
        described = {"name": name, "schema": schema, "required": is_required}
        if "description" in schema:
            described["description"] = schema["description"]
        return described

    if spec.c_function is not None:
        params = [descriptor(c_name, _NULL_SLOT, False) if target is None else
                  descriptor(target, properties[target], target in required and target != "handle")
                  for c_name, target in spec.c_params]
        structure = "either"
    else:
        params = [descriptor(name, schema, name in required) for name, schema in properties.items()]
        structure = "by-name"
    description = inspect.cleandoc(spec.doc)
    if spec.c_function is not None:
        description += (f"\n\nMirrors the C function {spec.c_function}. A null or absent handle means the default "
                        "handle (the default model, else the first loaded).")
    if spec.streams:
        description += (f"\n\nWhile it runs, `{CALLBACK_METHOD}` notifications carry the new text (state "
                        "RKLLM_RUN_NORMAL), then one with RKLLM_RUN_FINISH or RKLLM_RUN_ERROR; `\"stream\": false` "
                        "in a by-name call turns them off.")
    if spec.name in ("rkllm_run", "rkllm_run_async"):
        description += ('\n\nA flat object is also accepted: {"prompt": ..., "temperature": ..., "max_tokens": ..., '
                        '"top_k", "top_p", "keep_history", "role", "enable_thinking", "handle"}.')
    return {
        "name": method_name(spec.name),
        "summary": description.splitlines()[0],
        "description": description,
        "paramStructure": structure,
        "params": params,
        "result": {"name": "result", "schema": _schema(spec.result, "serialization", shared)},
        "errors": [{"$ref": f"#/components/errors/{code}"} for code in ERRORS],
    }


@cache
def _errors() -> dict[str, Any]:
    errors: dict[str, Any] = {}
    for row in ERRORS.values():
        number = INVALID_PARAMS if row.code == "INVALID_PARAMS" else row.number
        errors[row.code] = {"code": number, "message": f"{row.code}: {row.template}",
                            "data": {"code": row.code, "number": row.number, "hint": row.hint,
                                     "retryable": row.retryable}}
    return errors


def document(dispatcher: Dispatcher) -> dict[str, Any]:
    """The OpenRPC document of every method the dispatcher serves."""
    shared: dict[str, Any] = {}
    methods = [_method(spec, shared) for spec in dispatcher.methods.values()]
    return {
        "openrpc": OPENRPC_VERSION,
        "info": {"title": "mcp-rkllm JSON-RPC", "version": __version__,
                 "description": "RKLLM's C functions 1:1 (rkllm.*) and the friendly operations, on one engine."},
        "methods": methods,
        "components": {"schemas": shared, "errors": _errors()},
    }


def markdown_table(registry: Registry) -> str:
    """The README's JSON-RPC method table: each method, its positional form (C order; `null` for the slots the
    server owns), whether it streams `rkllm.callback` notifications, and what it does."""
    lines = ["| method | positional params (C order) | streams | what it does |", "|---|---|---|---|"]
    for spec in registry.specs.values():
        if spec.c_function is not None:
            slots = ", ".join(target if target is not None else f"null ({c_name})" for c_name, target in spec.c_params)
            positional = f"`[{slots}]`"
        else:
            positional = "by name only"
        lines.append(f"| `{method_name(spec.name)}` | {positional} | {'yes' if spec.streams else 'no'} | "
                     f"{spec.description.splitlines()[0]} |")
    lines.append("| `rpc.discover` | `[]` | no | This table as an OpenRPC 1.3 document, with params and result schemas "
                 "and the error table. |")
    lines.append('| `$/cancelRequest` | by name: `{"id": ...}` | no | Cancel one request of this connection (a '
                 "notification; the request answers CANCELLED). |")
    return "\n".join(lines)

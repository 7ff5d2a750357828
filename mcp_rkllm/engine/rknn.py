"""RKNN contexts for the `rknn_*` operations: librknnrt 1:1 (vision encoders and other `.rknn` models).

A context is an opaque id like an RKLLM handle, owned the same way (a session's own, freed when it ends;
shared without a session). The library is opened on first use (`--rknn-library` / RKNN_LIB_PATH, then the
usual places); model paths are confined to the model roots; every output buffer the runtime hands out is
released (the binding copies and releases in one call); outputs are bounded by `--max-output-floats`.
Calls on one context run one at a time, each on a worker thread of the server process: unlike RKLLM models,
RKNN contexts are not yet isolated in worker processes.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from mcp_rkllm.engine.relay import NO_STREAM, Stream
from mcp_rkllm.engine.types import (
    RknnContextParams,
    RknnContextResult,
    RknnCoreMaskParams,
    RknnInitParams,
    RknnInitResult,
    RknnInputData,
    RknnInputsParams,
    RknnOutputsParams,
    RknnOutputsResult,
    RknnQueryParams,
    RknnQueryResult,
    RknnRunParams,
)
from mcp_rkllm.errors import RkllmError

if TYPE_CHECKING:
    from mcp_rkllm.engine.engine import Engine
    from mcp_rkllm.native.rknn import RknnContext, RknnLibrary

log = logging.getLogger(__name__)


@dataclass
class RknnHandle:
    """One RKNN context and who may use it."""

    id: str
    context: RknnContext
    model_path: str
    owner: str | None
    limiter: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(1))
    last_used: float = field(default_factory=time.monotonic)


def _input_bytes(given: RknnInputData, where: str) -> bytes:
    if given.data is not None:
        try:
            return base64.b64decode(given.data, validate=True)
        except (binascii.Error, ValueError):
            raise RkllmError("INVALID_PARAMS", detail=f"{where}.data: not valid base64") from None
    from array import array

    assert given.values is not None
    kind = str(given.type).upper()
    codes = {"RKNN_TENSOR_UINT8": "B", "RKNN_TENSOR_INT8": "b", "RKNN_TENSOR_FLOAT32": "f", "0": "f", "3": "B",
             "2": "b", "RKNN_TENSOR_INT32": "i", "RKNN_TENSOR_INT16": "h", "RKNN_TENSOR_UINT16": "H"}
    code = codes.get(kind)
    if code is None:
        raise RkllmError("INVALID_PARAMS", detail=f"{where}.values: give `data` (base64) for type {given.type}")
    try:
        return array(code, given.values).tobytes()
    except (OverflowError, TypeError) as exc:
        raise RkllmError("INVALID_PARAMS", detail=f"{where}.values: {exc}") from None


class RknnContexts:
    """The engine's RKNN contexts, by id."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.contexts: dict[str, RknnHandle] = {}
        self._library: RknnLibrary | None = None
        self._open_lock = anyio.Lock()

    async def library(self, function: str) -> RknnLibrary:
        """librknnrt, opened on first use (RKNN_LIBRARY_UNAVAILABLE saying where it looked otherwise)."""
        async with self._open_lock:
            if self._library is None:
                from mcp_rkllm.native.rknn import RknnLibrary

                self._library = await anyio.to_thread.run_sync(RknnLibrary.open, self.engine.settings.rknn_library)
            return self._library

    def get(self, context: str, function: str, owner: str | None) -> RknnHandle:
        """The context, if `owner` may see it; UNKNOWN_HANDLE otherwise (as for one that never was)."""
        h = self.contexts.get(context)
        if h is None or (h.owner is not None and h.owner != owner):
            raise RkllmError("UNKNOWN_HANDLE", function=function, handle=context)
        h.last_used = time.monotonic()
        return h

    async def _call(self, h: RknnHandle, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=h.limiter)

    def _add(self, context: RknnContext, model_path: str, owner: str | None) -> RknnHandle:
        h = RknnHandle(f"r-{secrets.token_hex(8)}", context, model_path, owner)
        self.contexts[h.id] = h
        return h

    async def init(self, p: RknnInitParams, stream: Stream = NO_STREAM) -> RknnInitResult:
        """rknn_init of a `.rknn` file inside the model roots."""
        lib = await self.library("rknn_init")
        path = self.engine.paths.model_file(p.model_path, "rknn_init")
        if len(self.contexts) >= self.engine.settings.max_loaded_models:
            raise RkllmError("LIMIT_EXCEEDED", function="rknn_init", what="the number of RKNN contexts",
                             value=len(self.contexts) + 1, limit=self.engine.settings.max_loaded_models)
        ctx = await anyio.to_thread.run_sync(lambda: lib.init(path, p.flag))
        try:
            if p.core_mask is not None:
                await anyio.to_thread.run_sync(ctx.set_core_mask, p.core_mask)
            counts = await anyio.to_thread.run_sync(ctx.query, "RKNN_QUERY_IN_OUT_NUM")
            sdk = await anyio.to_thread.run_sync(ctx.sdk_version)
        except BaseException:
            await anyio.to_thread.run_sync(ctx.destroy)
            raise
        h = self._add(ctx, path, stream.owner)
        return RknnInitResult(context=h.id, n_input=counts["n_input"], n_output=counts["n_output"], sdk=sdk)

    async def query(self, p: RknnQueryParams, stream: Stream = NO_STREAM) -> RknnQueryResult:
        """rknn_query: the struct the command fills, as JSON."""
        h = self.get(p.context, "rknn_query", stream.owner)
        return RknnQueryResult(context=h.id, cmd=p.cmd, result=await self._call(h, h.context.query, p.cmd, p.index))

    async def inputs_set(self, p: RknnInputsParams, stream: Stream = NO_STREAM) -> RknnContextResult:
        """rknn_inputs_set."""
        h = self.get(p.context, "rknn_inputs_set", stream.owner)
        await self._call(h, h.context.inputs_set, self._inputs(p.inputs))
        return RknnContextResult(context=h.id)

    @staticmethod
    def _inputs(given: list[RknnInputData]) -> list[Any]:
        from mcp_rkllm.native.rknn import RknnInput

        return [RknnInput(index=i.index, buf=_input_bytes(i, f"inputs[{n}]"), type=i.type, fmt=i.fmt,
                          pass_through=i.pass_through) for n, i in enumerate(given)]

    async def run(self, p: RknnRunParams, stream: Stream = NO_STREAM) -> RknnOutputsResult:
        """rknn_run (no outputs in the result); with `input_data`, set the inputs, run and return the outputs."""
        h = self.get(p.context, "rknn_run", stream.owner)
        if p.input_data is None:
            await self._call(h, h.context.run)
            return RknnOutputsResult(context=h.id, outputs=[])
        inputs = self._inputs(p.input_data)

        def all_in_one() -> Any:
            h.context.inputs_set(inputs)
            h.context.run()
            return h.context.outputs_get(self._requests(p.outputs), max_bytes=self._max_bytes())

        return self._outputs(h, await self._call(h, all_in_one), p.encoding)

    def _max_bytes(self) -> int:
        return self.engine.settings.max_output_floats * 4

    @staticmethod
    def _requests(outputs: list[Any] | None) -> list[Any] | None:
        from mcp_rkllm.native.rknn import RknnOutputRequest

        if outputs is None:
            return None
        return [RknnOutputRequest(index=o.index, want_float=o.want_float) for o in outputs]

    @staticmethod
    def _outputs(h: RknnHandle, got: list[Any], encoding: str) -> RknnOutputsResult:
        rows = []
        for out in got:
            row: dict[str, Any] = {"index": out.index, "want_float": out.want_float, "size": out.size}
            if encoding == "array" and out.want_float:
                row["values"] = out.floats()
            else:
                row["data"] = base64.b64encode(out.data).decode()
            rows.append(row)
        return RknnOutputsResult(context=h.id, outputs=rows)

    async def outputs_get(self, p: RknnOutputsParams, stream: Stream = NO_STREAM) -> RknnOutputsResult:
        """rknn_outputs_get (copied out and released at once)."""
        h = self.get(p.context, "rknn_outputs_get", stream.owner)
        got = await self._call(h, h.context.outputs_get, self._requests(p.outputs), max_bytes=self._max_bytes())
        return self._outputs(h, got, p.encoding)

    async def outputs_release(self, p: RknnContextParams, stream: Stream = NO_STREAM) -> RknnContextResult:
        """rknn_outputs_release: outputs are released as they are fetched, so nothing is left to release."""
        h = self.get(p.context, "rknn_outputs_release", stream.owner)
        await self._call(h, h.context.outputs_release)
        return RknnContextResult(context=h.id)

    async def set_core_mask(self, p: RknnCoreMaskParams, stream: Stream = NO_STREAM) -> RknnContextResult:
        """rknn_set_core_mask."""
        h = self.get(p.context, "rknn_set_core_mask", stream.owner)
        await self._call(h, h.context.set_core_mask, p.core_mask)
        return RknnContextResult(context=h.id)

    async def dup_context(self, p: RknnContextParams, stream: Stream = NO_STREAM) -> RknnContextResult:
        """rknn_dup_context: a second context sharing the model's weights (owned like the first)."""
        h = self.get(p.context, "rknn_dup_context", stream.owner)
        dup = await self._call(h, h.context.dup_context)
        return RknnContextResult(context=self._add(dup, h.model_path, stream.owner).id)

    async def destroy(self, p: RknnContextParams, stream: Stream = NO_STREAM) -> RknnContextResult:
        """rknn_destroy: waits for a call in progress on the context, then frees it."""
        h = self.get(p.context, "rknn_destroy", stream.owner)
        self.contexts.pop(h.id, None)
        await self._call(h, h.context.destroy)
        return RknnContextResult(context=h.id, destroyed=True)

    async def release_owner(self, owner: str) -> None:
        """Free the contexts `owner` made (its session or connection ended)."""
        for h in [h for h in self.contexts.values() if h.owner == owner]:
            self.contexts.pop(h.id, None)
            await self._call(h, h.context.destroy)

    async def close(self) -> None:
        """Free every context (the server stops)."""
        for h in list(self.contexts.values()):
            self.contexts.pop(h.id, None)
            await self._call(h, h.context.destroy)

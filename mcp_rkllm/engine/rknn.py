"""RKNN contexts for the `rknn_*` operations: librknnrt 1:1 (vision encoders and other `.rknn` models).

A context is an opaque id like an RKLLM handle, owned the same way (a session's own, freed when it ends;
shared without a session). The library is opened on first use (`--rknn-library` / RKNN_LIB_PATH, then the
usual places); model paths are confined to the model roots; every output buffer the runtime hands out is
released (the binding copies and releases in one call); outputs are bounded by `--max-output-floats`.
Each rknn_init gets its own supervised worker process (`isolation.supervisor.RknnWorker`), shared by the
contexts rknn_dup_context makes from it; a librknnrt crash there is RUNTIME_CRASHED for those contexts only
(they are forgotten), and the server lives on. With `--isolation none` contexts live in the server process.
Calls on one context run one at a time.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import os
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
from mcp_rkllm.isolation.supervisor import RemoteRknnContext, RknnWorker, WorkerLimits

if TYPE_CHECKING:
    from mcp_rkllm.engine.engine import Engine
    from mcp_rkllm.native.rknn import RknnContext, RknnLibrary

log = logging.getLogger(__name__)


@dataclass
class RknnHandle:
    """One RKNN context and who may use it."""

    id: str
    context: RknnContext | RemoteRknnContext
    model_path: str
    owner: str | None
    limiter: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(1))
    last_used: float = field(default_factory=time.monotonic)


#: rknn_tensor_type -> the array code `values` are packed as: FLOAT32, INT8, UINT8, INT16, UINT16, INT32.
_PACKED = {0: "f", 2: "b", 3: "B", 4: "h", 5: "H", 6: "i"}
_FLOAT32_MAX = 3.4028234663852886e38


def _input_bytes(given: RknnInputData, where: str, function: str) -> bytes:
    if given.data is not None:
        try:
            return base64.b64decode(given.data, validate=True)
        except (binascii.Error, ValueError):
            raise RkllmError("INVALID_PARAMS", function=function, detail=f"{where}.data: not valid base64") from None
    from array import array

    from mcp_rkllm.native.abi.rknn import TENSOR_TYPES
    from mcp_rkllm.native.rknn import enum_name, enum_value

    assert given.values is not None
    kind = enum_value(given.type, TENSOR_TYPES, f"{where}.type", function)
    code = _PACKED.get(kind)
    name = enum_name(kind, TENSOR_TYPES)
    if code is None:
        raise RkllmError("INVALID_PARAMS", function=function, detail=f"{where}.values: give `data` (base64) for "
                                                                     f"type {name}")
    values = given.values  # JSON numbers arrive as floats: whole ones are packed as integers for integer types
    if code == "f":
        bad = next((v for v in values if not (math.isfinite(v) and abs(v) <= _FLOAT32_MAX)), None)
    else:
        bad = next((v for v in values if not v.is_integer()), None)
    if bad is not None:
        raise RkllmError("INVALID_PARAMS", function=function, detail=f"{where}.values: {bad!r} is not a value of "
                                                                     f"type {name}")
    try:
        return array(code, values if code == "f" else [int(v) for v in values]).tobytes()
    except OverflowError as exc:
        raise RkllmError("INVALID_PARAMS", function=function, detail=f"{where}.values: {exc} (type {name})") from None


class RknnContexts:
    """The engine's RKNN contexts, by id."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.contexts: dict[str, RknnHandle] = {}
        self._library: RknnLibrary | None = None
        self._opening = 0
        """rknn_init calls in progress (counted against max_loaded_models)."""
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
        try:
            return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=h.limiter)
        except RkllmError as exc:
            if exc.code != "RUNTIME_CRASHED" or not isinstance(h.context, RemoteRknnContext):
                raise
            # Its worker died: every context that lived there is gone (a dup shares its rknn_init's worker).
            host = h.context.host
            gone = [k for k, c in self.contexts.items()
                    if isinstance(c.context, RemoteRknnContext) and c.context.host is host]
            for k in gone:
                self.contexts.pop(k, None)
            log.error("RKNN context%s %s: the worker (pid %s) died: %s", "s" * (len(gone) > 1), ", ".join(gone),
                      host.worker.pid, exc.fields.get("detail"))
            raise RkllmError("RUNTIME_CRASHED", function=exc.function, **{**exc.fields, "handle": h.id}) from None

    def _isolated(self) -> bool:
        return self.engine.settings.isolation != "none"

    def _open(self, path: str, flag: Any) -> RknnContext | RemoteRknnContext:
        """rknn_init: in a new worker process (the default), or in this one with --isolation none."""
        s = self.engine.settings
        if self._isolated():
            host = RknnWorker(WorkerLimits(s.worker_timeout, s.load_timeout), f"(rknn {os.path.basename(path)})")
            return host.init(s.rknn_library, path, flag)
        assert self._library is not None
        return self._library.init(path, flag)

    def _add(self, context: RknnContext | RemoteRknnContext, model_path: str, owner: str | None) -> RknnHandle:
        h = RknnHandle(f"r-{secrets.token_hex(8)}", context, model_path, owner)
        self.contexts[h.id] = h
        if isinstance(context, RemoteRknnContext):
            context.host.worker.label = h.id if len(context.host.live) == 1 else context.host.worker.label
        return h

    def _check_room(self, function: str) -> None:
        """LIMIT_EXCEEDED when max_loaded_models contexts exist: inits in progress count (each starts a process), and
        so do dups (each holds its own runtime memory)."""
        limit = self.engine.settings.max_loaded_models
        if len(self.contexts) + self._opening >= limit:
            raise RkllmError("LIMIT_EXCEEDED", function=function, what="the number of RKNN contexts",
                             value=len(self.contexts) + self._opening + 1, limit=limit)

    async def init(self, p: RknnInitParams, stream: Stream = NO_STREAM) -> RknnInitResult:
        """rknn_init of a `.rknn` file inside the model roots."""
        if self._isolated():
            from mcp_rkllm.native.rknn import find_rknn_library

            find_rknn_library(self.engine.settings.rknn_library)  # no worker started to hear it is missing
        else:
            await self.library("rknn_init")
        path = self.engine.paths.model_file(p.model_path, "rknn_init")
        self._check_room("rknn_init")
        self._opening += 1
        try:
            with anyio.CancelScope(shield=True):  # a caller who leaves now finds it registered, so it gets freed
                ctx = await anyio.to_thread.run_sync(lambda: self._open(path, p.flag))
                h = self._add(ctx, path, stream.owner)
        finally:
            self._opening -= 1
        try:
            if p.core_mask is not None:
                await self._call(h, ctx.set_core_mask, p.core_mask)
            counts = await self._call(h, ctx.query, "RKNN_QUERY_IN_OUT_NUM")
            sdk = await self._call(h, ctx.sdk_version)
        except BaseException:
            if self.contexts.pop(h.id, None) is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(ctx.destroy)
            raise
        return RknnInitResult(context=h.id, n_input=counts["n_input"], n_output=counts["n_output"], sdk=sdk)

    async def query(self, p: RknnQueryParams, stream: Stream = NO_STREAM) -> RknnQueryResult:
        """rknn_query: the struct the command fills, as JSON."""
        h = self.get(p.context, "rknn_query", stream.owner)
        return RknnQueryResult(context=h.id, cmd=p.cmd, result=await self._call(h, h.context.query, p.cmd, p.index))

    async def inputs_set(self, p: RknnInputsParams, stream: Stream = NO_STREAM) -> RknnContextResult:
        """rknn_inputs_set."""
        h = self.get(p.context, "rknn_inputs_set", stream.owner)
        await self._call(h, h.context.inputs_set, self._inputs(p.inputs, "rknn_inputs_set"))
        return RknnContextResult(context=h.id)

    @staticmethod
    def _inputs(given: list[RknnInputData], function: str, where: str = "inputs") -> list[Any]:
        from mcp_rkllm.native.rknn import RknnInput

        return [RknnInput(index=i.index, buf=_input_bytes(i, f"{where}[{n}]", function), type=i.type, fmt=i.fmt,
                          pass_through=i.pass_through) for n, i in enumerate(given)]

    async def run(self, p: RknnRunParams, stream: Stream = NO_STREAM) -> RknnOutputsResult:
        """rknn_run (no outputs in the result); with `input_data`, set the inputs, run and return the outputs."""
        h = self.get(p.context, "rknn_run", stream.owner)
        if p.input_data is None:
            await self._call(h, h.context.run)
            return RknnOutputsResult(context=h.id, outputs=[])
        inputs = self._inputs(p.input_data, "rknn_run", "input_data")

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
        self._check_room("rknn_dup_context")
        self._opening += 1
        try:
            with anyio.CancelScope(shield=True):  # as in init: a caller who leaves now finds it registered, then freed
                dup = self._add(await self._call(h, h.context.dup_context), h.model_path, stream.owner)
        finally:
            self._opening -= 1
        return RknnContextResult(context=dup.id)

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
            await self._destroy_quietly(h)

    async def _destroy_quietly(self, h: RknnHandle) -> None:
        """rknn_destroy for a context nobody is waiting on; a failure is logged, never stops the others."""
        try:
            await self._call(h, h.context.destroy)
        except RkllmError as exc:
            log.warning("destroying RKNN context %s: %s", h.id, exc.message)

    async def reap_idle(self, keep: float) -> None:
        """rknn_destroy of contexts no call has named for `keep` seconds (and that no call is using)."""
        now = time.monotonic()
        for h in list(self.contexts.values()):
            if now - h.last_used > keep and h.limiter.borrowed_tokens == 0 and self.contexts.get(h.id) is h:
                log.info("destroying RKNN context %s (%s): idle for %.0f s (keep_alive)", h.id, h.model_path,
                         now - h.last_used)
                self.contexts.pop(h.id, None)
                await self._destroy_quietly(h)

    async def close(self) -> None:
        """Free every context (the server stops)."""
        for h in list(self.contexts.values()):
            self.contexts.pop(h.id, None)
            await self._destroy_quietly(h)

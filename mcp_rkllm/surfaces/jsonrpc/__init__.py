"""The JSON-RPC 2.0 surface: the registry as `rkllm.*` methods on a Unix socket and at HTTP `/jsonrpc`."""

from mcp_rkllm.surfaces.jsonrpc.protocol import Dispatcher, Peer, RpcError, method_name

__all__ = ["Dispatcher", "Peer", "RpcError", "method_name"]

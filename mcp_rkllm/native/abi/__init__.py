"""The RKLLM C declarations, one cdef text per ABI generation, written from the reference tables.

Each generation covers the runtime releases whose `rkllm.h` lays out every struct the same way:
`1.2.0`; `1.2.1` (1.2.1, 1.2.2, 1.2.3); `1.3.0`. Struct names follow the header of the
generation; `RKLLMMultiModelInput` (the spelling before 1.2.3) and `RKLLMMultiModalInput` name
the same type in every generation so both spellings can be searched for.
"""

from mcp_rkllm.native.abi import v1_2_0, v1_2_1, v1_3_0

#: ABI generation name -> cdef text.
CDEFS: dict[str, str] = {
    "1.2.0": v1_2_0.CDEF,
    "1.2.1": v1_2_1.CDEF,
    "1.3.0": v1_3_0.CDEF,
}

#: The generations, oldest first.
GENERATIONS: tuple[str, ...] = tuple(CDEFS)

#: The runtime releases each generation covers.
RELEASES: dict[str, tuple[str, ...]] = {
    "1.2.0": ("1.2.0",),
    "1.2.1": ("1.2.1", "1.2.2", "1.2.3"),
    "1.3.0": ("1.3.0",),
}

#: Every function any generation exports, in header order.
ALL_FUNCTIONS: tuple[str, ...] = (
    "rkllm_createDefaultParam",
    "rkllm_init",
    "rkllm_load_lora",
    "rkllm_load_prompt_cache",
    "rkllm_release_prompt_cache",
    "rkllm_destroy",
    "rkllm_run",
    "rkllm_run_async",
    "rkllm_abort",
    "rkllm_is_running",
    "rkllm_clear_kv_cache",
    "rkllm_get_kv_cache_size",
    "rkllm_set_chat_template",
    "rkllm_set_function_tools",
    "rkllm_set_cross_attn_params",
)

#: Functions added in 1.2.1 (absent from 1.2.0): their presence tells the generations apart.
ADDED_IN_1_2_1: tuple[str, ...] = (
    "rkllm_get_kv_cache_size",
    "rkllm_set_function_tools",
    "rkllm_set_cross_attn_params",
)

#: The functions each generation exports.
FUNCTIONS: dict[str, tuple[str, ...]] = {
    "1.2.0": tuple(f for f in ALL_FUNCTIONS if f not in ADDED_IN_1_2_1),
    "1.2.1": ALL_FUNCTIONS,
    "1.3.0": ALL_FUNCTIONS,
}

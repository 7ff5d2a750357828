"""The exported tools: the registry (`registry`), the 1:1 C API tools (`api`), handles (`handles`)."""

"""vLLM process supervision and the client pool the gateway routes through (no web framework here)."""

from service.vllm.pool import VLLMPool, VLLMRequestError, VLLMServer, VLLMUnavailable
from service.vllm.supervisor import VLLMOptions, VLLMSupervisor

__all__ = ["VLLMOptions", "VLLMPool", "VLLMRequestError", "VLLMServer", "VLLMSupervisor", "VLLMUnavailable"]

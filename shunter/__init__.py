"""Shunter: LLM serving across many instances with a global scheduler, and its simulator.

`from shunter import LLM, SamplingParams` for offline generation. The torch
half is imported only when `LLM` is first used, so the scheduler and the
simulator stay torch-free.
"""

from importlib.metadata import PackageNotFoundError, version as _version

from shunter.request import Request, RequestStatus, SamplingParams, TokenDelta

try:
    __version__ = _version("shunter")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "LLM", "Request", "RequestStatus", "SamplingParams", "TokenDelta"]


def __getattr__(name: str):
    if name == "LLM":
        from shunter.llm import LLM

        return LLM
    raise AttributeError(f"module 'shunter' has no attribute {name!r}")

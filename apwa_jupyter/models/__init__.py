"""Chat models behind one small interface: the real openai client, a scripted double, the embedded server."""

from .base import ChatModel, ChatRequest, ChatResponse, ToolCall, Usage

__all__ = ["ChatModel", "ChatRequest", "ChatResponse", "ToolCall", "Usage"]

"""A scripted chat model for tests and examples without a network: it answers each call with
the next message of its script, tool calls included, and accepts `bind_tools` as a real
tool-calling model does (the tools are ignored: the script already says what to call)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from pydantic import Field


class ScriptedChatModel(BaseChatModel):
    """Answers with `script[0]`, `script[1]`, ...; past the end, with `done`."""

    script: list[AIMessage]
    done: str = "done"
    seen: list[list[BaseMessage]] = Field(default_factory=list)
    """The messages of each call, for a test to look at what the model was told."""

    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
                   *, tool_choice: str | None = None, **kwargs: Any
                   ) -> Runnable[LanguageModelInput, AIMessage]:
        return self

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any
                  ) -> ChatResult:
        self.seen.append(list(messages))
        turn = len(self.seen) - 1
        reply = self.script[turn] if turn < len(self.script) else AIMessage(self.done)
        return ChatResult(generations=[ChatGeneration(message=reply)])

    @property
    def _llm_type(self) -> str:
        return "scripted"

"""Prompt → token ids exactly as the serving engine computes them."""

from kvforge.tokenize.chat import ChatOptions, ChatTemplate
from kvforge.tokenize.tokenizer import Prompt, PromptTokenizer, TokenizedPrompt

__all__ = ["ChatOptions", "ChatTemplate", "Prompt", "PromptTokenizer", "TokenizedPrompt"]

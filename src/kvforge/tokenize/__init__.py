"""Prompt → token ids exactly as the serving engine computes them."""

from kvforge.tokenize.chat import ChatTemplate
from kvforge.tokenize.tokenizer import Prompt, PromptTokenizer, TokenizedPrompt

__all__ = ["ChatTemplate", "Prompt", "PromptTokenizer", "TokenizedPrompt"]

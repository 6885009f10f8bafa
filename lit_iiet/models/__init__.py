from lit_iiet.models.lm import LanguageModel

__all__ = ["LanguageModel"]

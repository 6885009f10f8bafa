from lit_iiet.callbacks.text_writer import TextPredictionWriter

__all__ = ["TextPredictionWriter"]

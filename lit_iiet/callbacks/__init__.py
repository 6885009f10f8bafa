from lit_iiet.callbacks.gradients import GradientNorms
from lit_iiet.callbacks.iiad import IIAD
from lit_iiet.callbacks.influence import InfluenceLogger
from lit_iiet.callbacks.text_writer import TextPredictionWriter
from lit_iiet.callbacks.two_stage import TwoStage

__all__ = ["GradientNorms", "IIAD", "InfluenceLogger", "TextPredictionWriter", "TwoStage"]

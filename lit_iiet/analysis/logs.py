"""Read the scalars a run wrote to TensorBoard, for tests, benchmarks and notebooks."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] from every event file under log_dir (versions in order)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return scalars


def read_texts(log_dir: str | Path, tag: str) -> list[str]:
    """Texts logged with SummaryWriter.add_text under tag."""
    texts = []
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"tensors": 0})
        accumulator.Reload()
        if f"{tag}/text_summary" in accumulator.Tags()["tensors"]:
            for event in accumulator.Tensors(f"{tag}/text_summary"):
                texts += [s.decode() for s in event.tensor_proto.string_val]
    return texts

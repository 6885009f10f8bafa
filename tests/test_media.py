"""Text samples, images and histograms reach loggers other than TensorBoard: files beside a CSV logger's run."""

import numpy as np
from conftest import TINY
from matplotlib.image import imread

from lit_iiet.cli import main
from lit_iiet.media import png_bytes

CSV_AND_INFLUENCE = """
trainer:
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {save_dir}}}
  callbacks:
    - class_path: lit_iiet.callbacks.InfluenceLogger
      init_args: {{batches: 1}}
"""


def test_png_bytes_decode_to_the_same_pixels(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (3, 5, 7), dtype=np.uint8)
    (tmp_path / "a.png").write_bytes(png_bytes(image))
    decoded = imread(tmp_path / "a.png")  # float RGB in [0, 1], (H, W, 3)
    assert decoded.shape == (5, 7, 3) and np.array_equal(
        np.rint(decoded * 255).astype(np.uint8), image.transpose(1, 2, 0)
    )


def test_a_csv_logger_gets_the_sample_the_heatmap_and_the_histogram_as_files(tmp_path):
    config = tmp_path / "csv.yaml"
    config.write_text(CSV_AND_INFLUENCE.format(save_dir=tmp_path / "logs"))
    main(
        ["fit", *TINY, "--config", str(config), "--trainer.max_steps", "3", "--trainer.default_root_dir", str(tmp_path)]
    )
    media = next((tmp_path / "logs").rglob("media"))
    (sample,) = (media / "val_sample").iterdir()
    assert sample.name == "step_3.txt" and sample.read_text().startswith("ROMEO:")
    heatmap = imread(media / "iiet_increments" / "step_3.png")
    assert heatmap.shape == (2 * 24, 3 * 24, 3)  # 2 layers x 3 iterations, 24-pixel cells
    rows = (media / "iiet_evals_per_token" / "step_3.csv").read_text().splitlines()
    assert rows[0] == "value,count" and rows[1].startswith("3,")  # every token ran the 3 iterations

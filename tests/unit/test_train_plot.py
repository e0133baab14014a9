from PIL import Image

from pipelines.steps.train import plot_curves


def test_loss_curve_png(tmp_path):
    path = tmp_path / "loss.png"
    curves = {"loss": [(1, 6.0), (2, 5.0), (3, 4.5)], "lr": [(1, 1e-4), (2, 2e-4), (3, 1e-4)]}
    plot_curves(path, curves, title="demo stage1")
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (600, 350)
        # Not a blank canvas: the lines put more than one colour on it.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 10

import numpy as np
import torch
from torchvision.utils import flow_to_image

from sfc import vis


def test_colorize_maps_ids_and_ignore():
    palette = np.array([[128, 64, 128], [244, 35, 232], [70, 70, 70]], dtype=np.uint8)
    label = torch.tensor([[0, 1], [2, -1]])
    rgb = vis.colorize(label, palette)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [128, 64, 128]
    assert rgb[0, 1].tolist() == [244, 35, 232]
    assert rgb[1, 0].tolist() == [70, 70, 70]
    assert rgb[1, 1].tolist() == list(vis.IGNORE_COLOUR)
    # ids past the palette are drawn as ignore too
    assert vis.colorize(np.array([[7]]), palette)[0, 0].tolist() == list(vis.IGNORE_COLOUR)


def test_denormalize_seg_inverts_segnet_normalisation():
    rgb = np.array([[[10, 200, 30]]], dtype=np.uint8)  # 1×1 RGB
    bgr = rgb[..., ::-1].astype(np.float32).transpose(2, 0, 1)
    seg = bgr - np.asarray([104.00698793, 116.66876762, 122.67891434], np.float32)[:, None, None]
    assert vis.denormalize_seg(torch.from_numpy(seg)).tolist() == rgb.tolist()
    flow_in = bgr / 255.0
    assert vis.denormalize_flow_input(flow_in).tolist() == rgb.tolist()


def _flow():
    flow = torch.zeros(2, 3, 4)
    flow[0, 0, 0] = 1.0  # rightwards
    flow[0, 0, 1] = -1.0  # leftwards
    flow[1, 0, 2] = 1.0  # downwards
    return flow


def test_flow_to_rgb_is_torchvision_flow_to_image():
    flow = _flow() + 0.3 * torch.randn(2, 3, 4)
    want = flow_to_image(flow).permute(1, 2, 0).numpy()
    assert np.array_equal(vis.flow_to_rgb(flow), want)
    assert np.array_equal(vis.flow_to_rgb(flow.numpy()), want)  # numpy in, same picture


def test_flow_to_rgb_zero_is_white_and_directions_differ():
    assert (vis.flow_to_rgb(torch.zeros(2, 3, 4)) == 255).all()
    rgb = vis.flow_to_rgb(_flow()).astype(int)
    assert (rgb[1:] == 255).all()  # no motion: white
    assert len({tuple(rgb[0, k]) for k in range(3)}) == 3  # three directions, three hues
    assert all(rgb[0, k].min() == 0 for k in range(3))  # full magnitude: fully saturated


def test_fixed_scale_and_shared_scale():
    flow = _flow()
    full = vis.flow_to_rgb(flow).astype(int)
    half = vis.flow_to_rgb(flow * 0.5, max_mag=1.0).astype(int)
    # half the max magnitude on a fixed scale is paler: halfway between the colour and white
    assert np.abs(half[0, 0] - (full[0, 0] + 255) / 2).max() <= 1
    # a fixed scale equal to the flow's own maximum is the plain picture
    assert np.array_equal(vis.flow_to_rgb(flow, max_mag=1.0), full)
    # magnitudes beyond max_mag are clipped to full saturation
    assert np.array_equal(vis.flow_to_rgb(flow * 3, max_mag=1.0), full)
    # one scale for two flows: the weaker one is drawn as on the stronger one's scale
    a, b = vis.flows_to_rgb([flow, flow * 0.5])
    assert np.array_equal(a, full) and np.array_equal(b, half)


def test_side_by_side_and_stack_rows_shapes():
    a = np.zeros((8, 10, 3), np.uint8)
    b = np.full((4, 5, 3), 200, np.uint8)  # resized to a's size
    row = vis.side_by_side([a, b], titles=["a", "b"], pad=2)
    assert row.shape == (8 + vis.TITLE_H, 2 * 10 + 2, 3)
    assert (row[14:, :10] == 0).all() and (row[14:, 10:12] == 255).all()
    assert (row[14:, 12:] == 200).all()
    assert (row[:14] != 255).any()  # the titles are drawn
    assert np.array_equal(vis.side_by_side([a, b], pad=2), row[14:])
    grid = vis.stack_rows([row, a], pad=3)
    assert grid.shape == (22 + 3 + 8, 22, 3)
    assert (grid[25:, :10] == 0).all() and (grid[25:, 10:] == 255).all()


def test_flow_colours_and_grids_equal_torchvisions():
    """sfc.vis draws flow in NumPy (no torchvision import in the commands): the same pixels as
    torchvision.utils.flow_to_image, and grids as torchvision.utils.make_grid."""
    import numpy as np
    import torch
    from torchvision.utils import flow_to_image, make_grid

    from sfc import vis

    g = torch.Generator().manual_seed(0)
    for shape in ((2, 37, 53), (3, 2, 20, 30)):
        f = torch.randn(*shape, generator=g) * 5
        assert torch.equal(vis.flow_to_image(f), flow_to_image(f))
    rng = np.random.default_rng(0)
    ims = [rng.integers(0, 256, (8, 10, 3), dtype=np.uint8) for _ in range(5)]
    ref = make_grid([torch.from_numpy(i).permute(2, 0, 1) for i in ims], nrow=3, padding=4,
                    pad_value=255).permute(1, 2, 0).numpy()[4:-4, 4:-4]
    assert np.array_equal(vis._grid(ims, 3, 4), ref)


def test_no_command_imports_torchvision():
    import subprocess
    import sys

    code = ("import sys, sfc.train.cli, sfc.train.engine, sfc.evaluate.cli, sfc.predict.cli, "
            "sfc.vis; print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr

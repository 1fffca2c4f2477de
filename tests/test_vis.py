import numpy as np
import torch

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
    seg = bgr - np.asarray(vis.SEG_MEAN_BGR, np.float32)[:, None, None]
    assert vis.denormalize_seg(torch.from_numpy(seg)).tolist() == rgb.tolist()
    flow_in = bgr / 255.0
    assert vis.denormalize_flow_input(flow_in).tolist() == rgb.tolist()


def test_flow_to_rgb_zero_is_white_and_directions_differ():
    flow = np.zeros((2, 3, 4), np.float32)
    assert (vis.flow_to_rgb(flow) == 255).all()
    flow[0, 0, 0] = 1.0  # rightwards
    flow[0, 0, 1] = -1.0  # leftwards
    flow[1, 0, 2] = 1.0  # downwards
    rgb = vis.flow_to_rgb(flow).astype(int)
    assert rgb[0, 0].tolist() != rgb[0, 1].tolist() != rgb[0, 2].tolist()
    # full magnitude: fully saturated, some channel reaches 0 or the colour is pure
    assert rgb[0, 0].min() < 50
    # half the max magnitude on a fixed scale is paler than the full one
    half = vis.flow_to_rgb(flow * 0.5, max_mag=1.0).astype(int)
    assert half[0, 0].min() > rgb[0, 0].min()


def test_side_by_side_and_stack_rows_shapes():
    a = np.zeros((8, 10, 3), np.uint8)
    b = np.full((4, 5, 3), 200, np.uint8)  # resized to a's size
    row = vis.side_by_side([a, b], titles=["a", "b"], pad=2)
    assert row.shape == (8 + 14, 2 * 10 + 2, 3)
    assert (row[14:, 12:] == 200).all()
    grid = vis.stack_rows([row, a], pad=3)
    assert grid.shape == (22 + 3 + 8, 22, 3)

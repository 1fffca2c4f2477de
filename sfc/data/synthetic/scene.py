"""Procedural street scenes for the synthetic video domains (used by ``sfc.data.synthetic``).

A ``Scene`` is one video: a street (sky, road with moving lane dashes, sidewalks, terrain),
buildings with windows, trees, hedges, fences, poles with signs and lights, cars, trucks,
buses, pedestrians and riders. The camera scrolls sideways (layers at different depths move at
different speeds: parallax) and drives forward (the ground's texture and lane dashes stream
towards the camera), while vehicles and people move on their own, so consecutive frames are
related by a coherent, non-trivial optical flow. ``paint`` lays out one frame: a *canonical*
class map (``CANON``), a surface id per pixel and the **forward flow** of every pixel (where its
surface point is one frame later); ``render`` shades it into an RGB image whose appearance comes
from a ``Style`` (one per domain); ``forward_flow`` turns two painted frames into the ground
truth flow t → t+1, NaN where the point leaves the frame or is hidden at t+1.

Coordinates: x in units of the image width, y in units of the image height, both in [0, 1];
sizes of objects are in width units and converted with the aspect ratio, so a scene looks the
same at 256×144 and at 1920×1080. All drawing is vectorised NumPy on bounding-box slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

CANON = ["void", "road", "sidewalk", "building", "fence", "pole", "traffic light",
         "traffic sign", "vegetation", "tree", "terrain", "sky", "person", "rider", "car",
         "truck", "bus", "motorcycle", "bicycle", "ego"]
K = {n: i for i, n in enumerate(CANON)}
SKY, GROUND, EGO = 1, 2, 3  # surface ids of the three whole-frame surfaces; objects count on
SPAN = (-1.5, 2.5)  # x range (width units) over which objects are scattered


@dataclass
class Style:
    """Appearance of one domain: base colours (RGB 0-255) and camera/lighting effects."""

    colours: dict[str, tuple[float, float, float]]
    vehicle_colours: list[tuple[float, float, float]]
    sky: tuple[tuple[float, float, float], tuple[float, float, float]]  # top, horizon
    texture: float = 0.1       # relative amplitude of surface texture
    noise: float = 2.0         # std of per-pixel sensor noise, 0-255 units
    blur: float = 0.0          # Gaussian sigma in pixels at 256 px width (scaled with width)
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    gamma: float = 1.0
    vignette: float = 0.0      # darkening at the corners (0-1)
    shade_jitter: float = 0.15  # per-object brightness variation
    extra: dict = field(default_factory=dict)


class Canvas:
    """One painted frame: class map, instance map, colour, texture coordinates, surface id and
    forward flow of every pixel.

    ``tu``/``tv``: texture coordinates in width units (a surface point keeps its coordinates as
    it moves, so its texture moves with it); ``sid``: which surface the pixel shows (its id is
    the same in every frame); ``fx``/``fy``: forward flow in pixels (column, row) per frame.
    """

    def __init__(self, w: int, h: int):
        self.w, self.h = w, h
        self.cls = np.zeros((h, w), np.uint8)
        self.inst = np.zeros((h, w), np.uint16)
        self.col = np.zeros((h, w, 3), np.float32)
        self.xs = (np.arange(w, dtype=np.float32) + 0.5) / w
        self.ys = (np.arange(h, dtype=np.float32) + 0.5) / h
        self.tu = np.broadcast_to(self.xs[None, :], (h, w)).copy()
        self.tv = np.broadcast_to((np.arange(h, dtype=np.float32) / w)[:, None], (h, w)).copy()
        self.sid = np.zeros((h, w), np.int32)
        self.fx = np.zeros((h, w), np.float32)
        self.fy = np.zeros((h, w), np.float32)
        self.n_inst = 0
        self.n_sid = 10

    def _box(self, x0, x1, y0, y1):
        c0, c1 = max(int(np.floor(x0 * self.w)), 0), min(int(np.ceil(x1 * self.w)), self.w)
        r0, r1 = max(int(np.floor(y0 * self.h)), 0), min(int(np.ceil(y1 * self.h)), self.h)
        return r0, r1, c0, c1

    def paint(self, sl, mask, name, colour, toff=0.0, inst=0, sid=0, move=(0.0, 0.0),
              tex=None):
        """Paint class ``name`` in the box ``sl`` where ``mask`` (None: all of it). ``move``:
        the surface's motion (dx, dy) per frame in width/height units, scalars or box-shaped
        arrays; ``tex``: box-shaped (tu, tv) arrays, else tu = x - toff and tv by row."""
        r0, r1, c0, c1 = sl
        if r1 <= r0 or c1 <= c0:
            return
        shape = (r1 - r0, c1 - c0)
        m = mask if mask is not None else slice(None)  # None: the whole box

        def put(arr, value):
            box = arr[r0:r1, c0:c1]
            box[m] = np.broadcast_to(value, shape)[m] if np.ndim(value) == 2 else value

        put(self.cls, K[name])
        put(self.inst, inst)
        put(self.col, colour)
        put(self.sid, sid)
        put(self.fx, np.asarray(move[0], np.float32) * self.w)
        put(self.fy, np.asarray(move[1], np.float32) * self.h)
        if tex is None:
            put(self.tu, (self.xs[c0:c1] - toff)[None, :])
            put(self.tv, (np.arange(r0, r1, dtype=np.float32) / self.w)[:, None])
        else:
            put(self.tu, tex[0])
            put(self.tv, tex[1])

    def rect(self, x0, x1, y0, y1, name, colour, toff=0.0, inst=0, sid=0, move=(0.0, 0.0)):
        self.paint(self._box(x0, x1, y0, y1), None, name, colour, toff, inst, sid, move)

    def ellipse(self, cx, cy, rx, ry, name, colour, toff=0.0, inst=0, sid=0, move=(0.0, 0.0)):
        sl = self._box(cx - rx, cx + rx, cy - ry, cy + ry)
        r0, r1, c0, c1 = sl
        if r1 <= r0 or c1 <= c0:
            return
        dx = (self.xs[c0:c1] - cx) / max(rx, 1e-6)
        dy = (self.ys[r0:r1] - cy) / max(ry, 1e-6)
        self.paint(sl, dx[None, :] ** 2 + dy[:, None] ** 2 <= 1.0, name, colour, toff, inst,
                   sid, move)

    def new_inst(self) -> int:
        self.n_inst += 1
        return self.n_inst

    def new_sid(self) -> int:
        """A surface id for the next object (the same object gets the same id in every frame:
        objects are always drawn in the same order, visible or not)."""
        self.n_sid += 1
        return self.n_sid


def forward_flow(cur: Canvas, nxt: Canvas) -> np.ndarray:
    """Ground-truth forward flow of frame t (``cur``) to t+1 (``nxt``): (H, W, 2) float32 (u =
    columns, v = rows, pixels), NaN where invalid — the point leaves the frame, or at t+1 the
    pixel nearest to where it went shows another surface (occluded)."""
    h, w = cur.sid.shape
    qx = np.arange(w, dtype=np.float32)[None, :] + cur.fx
    qy = np.arange(h, dtype=np.float32)[:, None] + cur.fy
    inside = (qx >= -0.5) & (qx < w - 0.5) & (qy >= -0.5) & (qy < h - 0.5)
    ri = np.clip(np.round(np.nan_to_num(qy)), 0, h - 1).astype(np.int64)
    ci = np.clip(np.round(np.nan_to_num(qx)), 0, w - 1).astype(np.int64)
    valid = inside & (nxt.sid[ri, ci] == cur.sid)
    flow = np.stack([cur.fx, cur.fy], axis=2)
    flow[~valid] = np.nan
    return flow


class Scene:
    """One video's world: sampled once from ``rng``, rendered at any frame index ``t``."""

    def __init__(self, rng: np.random.Generator, ego: str | None = None, riders=True):
        u = rng.uniform
        self.ego = ego  # None, or the canonical class of the ego-vehicle hood ("ego" / "car")
        self.yh = u(0.38, 0.48)          # horizon
        self.vx = u(0.42, 0.58)          # vanishing point x
        self.road_w = u(0.45, 0.65)      # road half-width at the bottom row
        self.walk_w = u(0.18, 0.3)       # sidewalk width at the bottom row
        # sideways scroll, width units/frame (2.3-4 px a frame at 128 px width)
        self.cam_v = u(0.018, 0.032) * rng.choice([-1, 1])
        self.fwd_v = u(0.03, 0.08)       # forward speed: lane-dash phase per frame
        span = SPAN
        self.buildings = []
        x = span[0] - 1.0
        while x < span[1] + 1.0:
            w = u(0.12, 0.35)
            self.buildings.append((x, x + w, u(0.03, self.yh - 0.1), u(0.7, 1.3), u(0.04, 0.07)))
            x += w + u(0.0, 0.05)
        self.trees = [(u(*span), u(0.05, 0.12), u(0.08, 0.2)) for _ in range(rng.integers(3, 9))]
        self.hedges = [(a, a + u(0.1, 0.4)) for a in rng.uniform(*span, rng.integers(1, 5))]
        self.fences = [(a, a + u(0.15, 0.5)) for a in rng.uniform(*span, rng.integers(0, 4))]
        self.poles = [(u(*span), rng.choice(["traffic sign", "traffic light", "none"]))
                      for _ in range(rng.integers(3, 7))]
        kinds = ["car"] * 6 + ["truck", "bus"]
        self.vehicles = []
        for _ in range(rng.integers(3, 8)):
            # bottom edge; VIPER-like scenes keep cars clear of the ego hood (y > 0.88)
            yb = u(self.yh + 0.08, 0.86)
            # own speed 0.03-0.06 width units/frame either way: well above the camera's scroll
            self.vehicles.append((str(rng.choice(kinds)), u(*span), yb,
                                  u(0.03, 0.06) * rng.choice([-1, 1]),
                                  int(rng.integers(0, 1 << 16))))
        self.people = [(u(*span), u(self.yh + 0.04, self.yh + 0.3),
                        u(0.004, 0.01) * rng.choice([-1, 1]), rng.choice([-1, 1]), u(0, 6.28))
                       for _ in range(rng.integers(3, 8))]
        self.riders = [(u(*span), u(self.yh + 0.1, 0.8), u(0.02, 0.04) * rng.choice([-1, 1]),
                        str(rng.choice(["bicycle", "motorcycle"])))
                       for _ in range(rng.integers(0, 4) if riders else 0)]
        self.tex_seed = int(rng.integers(0, 1 << 31))

    # --- drawing -----------------------------------------------------------------------
    def render(self, t: int, w: int, h: int, style: Style, noise_rng: np.random.Generator):
        """Frame ``t`` -> (canonical class map (H, W) uint8, instances (H, W) uint16,
        RGB (H, W, 3) uint8)."""
        cv = self.paint(t, w, h, style)
        return cv.cls, cv.inst, self.shade(cv, style, noise_rng)

    def paint(self, t: int, w: int, h: int, style: Style) -> Canvas:
        """Lay out frame ``t`` (classes, colours, surfaces, forward flow); no shading."""
        cv = Canvas(w, h)
        a = w / h  # converts width units to height units
        cam, cv_ = self.cam_v * t, self.cam_v
        col = style.colours
        sky_top, sky_hor = np.array(style.sky[0], np.float32), np.array(style.sky[1], np.float32)
        frac = np.clip(cv.ys / self.yh, 0, 1)[:, None, None]
        cv.col[:] = sky_top * (1 - frac) + sky_hor * frac
        cv.cls[:] = K["sky"]
        cv.sid[:] = SKY  # still: at infinity a sideways move does not move the sky
        self._ground(cv, col, t, a)
        for x0, x1, top, shade, win in self.buildings:
            s0, s1, sid, mv = x0 - 0.6 * cam, x1 - 0.6 * cam, cv.new_sid(), (-0.6 * cv_, 0.0)
            c = np.array(col["building"]) * (1 + style.shade_jitter * (shade - 1) * 3)
            cv.rect(s0, s1, top, self.yh + 0.02, "building", c, toff=-0.6 * cam, sid=sid,
                    move=mv)
            r0, r1, c0, c1 = cv._box(s0, s1, top + 0.03, self.yh - 0.02)
            if r1 > r0 and c1 > c0:  # windows: a world-anchored grid, still "building"
                gx = ((cv.xs[c0:c1] - s0) / win) % 1.0 < 0.5
                gy = ((cv.ys[r0:r1] - top) / (win * a)) % 1.0 < 0.45
                cv.paint((r0, r1, c0, c1), gx[None, :] & gy[:, None], "building",
                         np.array(col["window"]), toff=-0.6 * cam, sid=sid, move=mv)
        for x0, x1 in self.hedges:
            cv.rect(x0 - 0.9 * cam, x1 - 0.9 * cam, self.yh - 0.04, self.yh + 0.03, "vegetation",
                    col["vegetation"], toff=-0.9 * cam, sid=cv.new_sid(),
                    move=(-0.9 * cv_, 0.0))
        for x0, x1 in self.fences:
            s0, sid = x0 - cam, cv.new_sid()
            r0, r1, c0, c1 = cv._box(s0, x1 - cam, self.yh - 0.05, self.yh + 0.05)
            if r1 > r0 and c1 > c0:
                slats = ((cv.xs[c0:c1] - s0) / 0.015) % 1.0 < 0.6
                rails = (np.abs(cv.ys[r0:r1] - (self.yh - 0.04)) < 0.008)
                cv.paint((r0, r1, c0, c1), slats[None, :] | rails[:, None], "fence",
                         col["fence"], toff=-cam, sid=sid, move=(-cv_, 0.0))
        for x, rx, ry in self.trees:
            sx, sid, mv = x - 0.8 * cam, cv.new_sid(), (-0.8 * cv_, 0.0)
            cv.rect(sx - 0.008, sx + 0.008, self.yh - 0.1, self.yh + 0.03, "tree",
                    col["trunk"], toff=-0.8 * cam, sid=sid, move=mv)
            cv.ellipse(sx, self.yh - 0.1 - ry * 0.8, rx, ry, "tree", col["tree"], toff=-0.8 * cam,
                       sid=sid, move=mv)
        for x, kind in self.poles:
            sx, sid, mv = x - cam, cv.new_sid(), (-cv_, 0.0)
            cv.rect(sx - 0.004, sx + 0.004, self.yh - 0.28, self.yh + 0.1, "pole", col["pole"],
                    toff=-cam, sid=sid, move=mv)
            if kind == "traffic sign":
                cv.ellipse(sx, self.yh - 0.28, 0.02, 0.02 * a, "traffic sign",
                           col["traffic sign"], toff=-cam, sid=sid, move=mv)
            elif kind == "traffic light":
                cv.rect(sx - 0.008, sx + 0.008, self.yh - 0.3, self.yh - 0.2, "traffic light",
                        col["traffic light"], toff=-cam, sid=sid, move=mv)
                lamp = [(255, 40, 30), (250, 200, 30), (40, 230, 60)][(t // 8) % 3]
                cv.ellipse(sx, self.yh - 0.25, 0.004, 0.004 * a, "traffic light", lamp,
                           toff=-cam, sid=sid, move=mv)
        movers = [(yb, "v", v) for yb, v in ((v[2], v) for v in self.vehicles)]
        movers += [(p[1], "p", p) for p in self.people] + [(r[1], "r", r) for r in self.riders]
        for _, kind, obj in sorted(movers, key=lambda m: m[0]):  # far (small y) first
            if kind == "v":
                self._vehicle(cv, obj, t, cam, a, style)
            elif kind == "p":
                x, yb, v, _, phase = obj
                self._person(cv, x + v * t - cam, v - cv_, yb, t, phase, a, "person",
                             col["person"])
            else:
                self._rider(cv, obj, t, cam, a, col)
        if self.ego:
            cv.ellipse(0.5, 1.06, 0.33, 0.13, self.ego, col["ego"], sid=EGO)
        return cv

    def _ground(self, cv: Canvas, col, t, a):
        """Road, sidewalks, terrain and lane dashes on a ground plane the camera drives over:
        a ground point at depth z = 1/d (d = 0 at the horizon, 1 at the bottom row) is at
        z - fwd one frame later, fwd = fwd_v / 0.3 (the dashes' phase per unit of depth is 0.3),
        and keeps its lateral world position (x - vx) / d."""
        r0 = int(np.floor(self.yh * cv.h))
        ys = cv.ys[r0:]
        d = np.clip((ys - self.yh) / (1 - self.yh), 1e-3, 1)[:, None]  # 0 at horizon, 1 bottom
        dx = np.abs(cv.xs[None, :] - self.vx)
        road = dx < self.road_w * d
        walk = ~road & (dx < (self.road_w + self.walk_w) * d)
        sl = (r0, cv.h, 0, cv.w)
        fwd = self.fwd_v / 0.3
        z = 1.0 / d
        z1 = z - fwd
        d1 = np.where(z1 > 0, 1.0 / np.maximum(z1, 1e-6), np.inf)  # passed the camera: inf
        world_x = (cv.xs[None, :] - self.vx) / d
        move = ((self.vx + world_x * d1 - cv.xs[None, :]).astype(np.float32),
                np.broadcast_to((self.yh + d1 * (1 - self.yh) - ys[:, None]).astype(np.float32),
                                world_x.shape))
        tex = (self.vx + world_x, np.broadcast_to((z + fwd * t) * (1 - self.yh) / a,
                                                  world_x.shape))
        kw = dict(sid=GROUND, move=move, tex=tex)
        cv.paint(sl, ~road & ~walk, "terrain", col["terrain"], **kw)
        cv.paint(sl, walk, "sidewalk", col["sidewalk"], **kw)
        cv.paint(sl, road, "road", col["road"], **kw)
        # lane dashes: world-depth phase 0.3 z moves towards the camera with fwd_v per frame
        dash = (dx < 0.012 * d) & (((0.3 / d) + self.fwd_v * t) % 1.0 < 0.5)
        cv.paint(sl, dash, "road", col["marking"], **kw)

    def _vehicle(self, cv: Canvas, obj, t, cam, a, style):
        kind, x, yb, v, cseed = obj
        s = (yb - self.yh) / (1 - self.yh)  # perspective scale
        cx = x + v * t - cam
        colour = np.array(style.vehicle_colours[cseed % len(style.vehicle_colours)], np.float32)
        inst = cv.new_inst()
        kw = dict(toff=cx, inst=inst, sid=cv.new_sid(), move=(v - self.cam_v, 0.0))
        wid = {"car": 0.32, "truck": 0.42, "bus": 0.5}[kind] * s
        hgt = {"car": 0.1, "truck": 0.26, "bus": 0.28}[kind] * s * a
        cv.rect(cx - wid / 2, cx + wid / 2, yb - hgt, yb - 0.02 * s * a, kind, colour, **kw)
        if kind == "car":  # cabin and windows
            cv.rect(cx - wid * 0.32, cx + wid * 0.32, yb - hgt * 1.7, yb - hgt, kind,
                    colour * 0.9, **kw)
            cv.rect(cx - wid * 0.26, cx + wid * 0.26, yb - hgt * 1.6, yb - hgt * 1.1, kind,
                    np.array(style.colours["glass"]), **kw)
        else:
            cv.rect(cx - wid * 0.45, cx + wid * 0.45, yb - hgt * 0.9, yb - hgt * 0.6, kind,
                    np.array(style.colours["glass"]), **kw)
        for wx in (-0.33, 0.33):
            cv.ellipse(cx + wx * wid, yb - 0.03 * s * a, 0.05 * s, 0.03 * s * a, kind,
                       np.array(style.colours["tyre"]), **kw)

    def _person(self, cv: Canvas, cx, vx, yb, t, phase, a, name, colour, s=None):
        """A walking person at ``cx`` moving ``vx`` width units per frame (in the image)."""
        s = (yb - self.yh) / (1 - self.yh) if s is None else s
        hgt = 0.3 * s * a
        inst = cv.new_inst()
        c = np.array(colour, np.float32)
        swing = 0.025 * s * np.sin(0.6 * t + phase)
        swing1 = 0.025 * s * np.sin(0.6 * (t + 1) + phase)
        for sign in (-1, 1):  # legs swing in opposite phase: surfaces of their own
            lx = cx + sign * swing
            cv.rect(lx - 0.01 * s, lx + 0.01 * s, yb - hgt * 0.45, yb, name, c * 0.7, lx, inst,
                    cv.new_sid(), (vx + sign * (swing1 - swing), 0.0))
        kw = dict(toff=cx, inst=inst, sid=cv.new_sid(), move=(vx, 0.0))
        cv.ellipse(cx, yb - hgt * 0.65, 0.035 * s, hgt * 0.22, name, c, **kw)
        cv.ellipse(cx, yb - hgt * 0.92, 0.018 * s, 0.018 * s * a, name, c * 1.1 + 30, **kw)

    def _rider(self, cv: Canvas, obj, t, cam, a, col):
        x, yb, v, kind = obj
        s = (yb - self.yh) / (1 - self.yh)
        cx = x + v * t - cam
        inst = cv.new_inst()
        kw = dict(toff=cx, inst=inst, sid=cv.new_sid(), move=(v - self.cam_v, 0.0))
        for wx in (-0.05, 0.05):
            cv.ellipse(cx + wx * s, yb - 0.03 * s * a, 0.03 * s, 0.03 * s * a, kind, col[kind],
                       **kw)
        cv.rect(cx - 0.05 * s, cx + 0.05 * s, yb - 0.06 * s * a, yb - 0.045 * s * a, kind,
                col[kind], **kw)
        self._person(cv, cx, v - self.cam_v, yb - 0.05 * s * a, t, 0.0, a, "rider",
                     col["person"], s=s * 0.8)

    def shade(self, cv: Canvas, style: Style, rng: np.random.Generator) -> np.ndarray:
        """The RGB image (H, W, 3) uint8 of a painted frame in ``style``."""
        h, w = cv.h, cv.w
        tex = _texture(self.tex_seed)  # (128, 128) in [-1, 1]
        ti = np.floor(cv.tv * 128 * 4).astype(np.int64) % 128  # 512 texels per width unit
        tj = np.floor(cv.tu * 128 * 4).astype(np.int64) % 128
        img = cv.col  # painted in place from here on (float32)
        img *= (1.0 + style.texture * tex[ti, tj])[:, :, None]
        light = np.array(style.tint, np.float32)[None, None, :]
        if style.vignette:
            r2 = (cv.xs[None, :] - 0.5) ** 2 + (cv.ys[:, None] - 0.5) ** 2
            light = light * (1.0 - style.vignette * r2 / 0.5)[:, :, None]
        img *= light
        if style.blur:
            img = cv2.GaussianBlur(img, (0, 0), style.blur * w / 256)
        img += style.noise * rng.standard_normal(img.shape, dtype=np.float32)
        np.clip(img + 0.5, 0, 255, out=img)
        gamma = (255.0 * (np.arange(256) / 255.0) ** style.gamma + 0.5).astype(np.uint8)
        return gamma[img.astype(np.uint8)]

_TEX: dict[int, np.ndarray] = {}


def _texture(seed: int) -> np.ndarray:
    """(128, 128) float32 smooth value noise in [-1, 1], tileable, cached per seed."""
    if seed not in _TEX:
        rng = np.random.default_rng(seed)
        base = rng.uniform(-1, 1, (16, 16)).astype(np.float32)
        fine = rng.uniform(-1, 1, (64, 64)).astype(np.float32)
        big = cv2.resize(np.tile(base, (3, 3)), (384, 384), interpolation=cv2.INTER_CUBIC)
        small = cv2.resize(np.tile(fine, (3, 3)), (384, 384), interpolation=cv2.INTER_LINEAR)
        tex = 0.6 * big[128:256, 128:256] + 0.4 * small[128:256, 128:256]
        _TEX[seed] = np.clip(tex, -1, 1)
    return _TEX[seed]

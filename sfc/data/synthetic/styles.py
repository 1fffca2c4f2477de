"""The three synthetic domains' appearance and class encodings (``sfc.data.synthetic``).

Sources (VIPER: game-like, saturated, sharp, warm; SYNTHIA-Seq: dawn, dark, orange tint, flat)
and target (Cityscapes: overcast, desaturated, textured, noisy, blurred, vignetted) share the
scene generator and classes but not colours, so a source-trained model loses accuracy on the
target (measured in docs/data.md).
"""

from __future__ import annotations

from sfc.data.synthetic.scene import Style

_COMMON = {"marking": (215, 215, 205), "glass": (45, 55, 70), "tyre": (25, 25, 25),
           "trunk": (90, 65, 40), "traffic light": (40, 40, 40)}

VIPER_STYLE = Style(
    colours={**_COMMON, "road": (80, 80, 88), "sidewalk": (160, 148, 135),
             "terrain": (125, 135, 55), "building": (175, 140, 105), "window": (55, 70, 95),
             "vegetation": (65, 135, 40), "tree": (50, 118, 38), "fence": (145, 118, 90),
             "pole": (95, 95, 100), "traffic sign": (225, 205, 40), "person": (160, 55, 55),
             "motorcycle": (70, 70, 80), "bicycle": (170, 40, 40), "ego": (130, 20, 25)},
    vehicle_colours=[(200, 30, 30), (30, 60, 190), (230, 230, 230), (20, 20, 20),
                     (240, 190, 30), (40, 150, 60), (150, 150, 160)],
    sky=((80, 145, 235), (185, 215, 245)),
    texture=0.08, noise=1.5, blur=0.3, tint=(1.05, 1.0, 0.92), gamma=0.95,
)

SYNTHIA_STYLE = Style(
    colours={**_COMMON, "road": (95, 90, 95), "sidewalk": (185, 170, 160),
             "terrain": (120, 125, 70), "building": (195, 175, 150), "window": (80, 90, 110),
             "vegetation": (75, 125, 55), "tree": (60, 110, 50), "fence": (160, 140, 110),
             "pole": (110, 110, 115), "traffic sign": (230, 220, 80), "person": (140, 80, 70),
             "motorcycle": (80, 80, 90), "bicycle": (60, 120, 180), "ego": (60, 60, 60)},
    vehicle_colours=[(180, 40, 40), (40, 80, 170), (220, 220, 220), (200, 170, 40),
                     (120, 120, 130)],
    sky=((60, 60, 115), (245, 160, 100)),
    texture=0.05, noise=1.0, blur=0.0, tint=(1.1, 0.82, 0.62), gamma=1.3,
)

CITYSCAPES_STYLE = Style(
    colours={**_COMMON, "road": (128, 118, 124), "sidewalk": (172, 162, 170),
             "terrain": (135, 145, 100), "building": (118, 114, 104), "window": (85, 92, 98),
             "vegetation": (78, 98, 48), "tree": (66, 90, 44), "fence": (150, 142, 130),
             "pole": (125, 125, 122), "traffic sign": (205, 205, 195), "person": (85, 75, 88),
             "motorcycle": (55, 55, 60), "bicycle": (60, 60, 70), "ego": (58, 58, 64)},
    vehicle_colours=[(150, 150, 155), (30, 30, 35), (215, 215, 220), (40, 50, 90),
                     (110, 35, 35), (90, 95, 90)],
    sky=((178, 190, 202), (218, 222, 226)),
    texture=0.2, noise=5.0, blur=0.9, tint=(0.95, 1.0, 1.03), gamma=1.1, vignette=0.25,
)

# canonical class (sfc.data.scene.CANON) -> the dataset's own label id
VIPER_IDS = {"void": 0, "road": 3, "sidewalk": 4, "building": 9, "fence": 11,
             "pole": 10,  # VIPER "infrastructure": not one of the 15 classes -> ignore
             "traffic light": 13, "traffic sign": 14, "vegetation": 8, "tree": 7,
             "terrain": 6, "sky": 2, "person": 20, "rider": 20, "car": 24, "truck": 27,
             "bus": 26, "motorcycle": 23, "bicycle": 22,
             "ego": 24}  # the ego hood is a car in VIPER: the loader must remove it
CITYSCAPES_IDS = {"void": 0, "ego": 1, "road": 7, "sidewalk": 8, "building": 11, "fence": 13,
                  "pole": 17, "traffic light": 19, "traffic sign": 20, "vegetation": 21,
                  "tree": 21, "terrain": 22, "sky": 23, "person": 24, "rider": 25, "car": 26,
                  "truck": 27, "bus": 28, "motorcycle": 32, "bicycle": 33}
SYNTHIA_IDS = {"void": 0, "sky": 1, "building": 2, "road": 3, "sidewalk": 4, "fence": 5,
               "vegetation": 6, "tree": 6, "terrain": 6, "pole": 7, "car": 8, "truck": 8,
               "bus": 8, "traffic sign": 9, "person": 10, "rider": 10, "bicycle": 11,
               "motorcycle": 11, "traffic light": 15, "ego": 0}

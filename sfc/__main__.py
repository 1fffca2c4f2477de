"""``python -m sfc``: the commands of the package, one line each."""

COMMANDS = [
    ("python -m sfc.train", "sfc-train", "one training run (stage segnet, accel, sfm or flownet); "
                                         "resumes from OUT/last.pt"),
    ("python -m sfc.evaluate", "sfc-evaluate", "mIoU (keyframe distance, temporal consistency) "
                                               "of a checkpoint; --flow: a FlowNetS's EPE"),
    ("python -m sfc.evaluate.premise", "sfc-premise", "flow error and segmentation accuracy on "
                                                      "source and target, side by side"),
    ("python -m sfc.predict", "sfc-predict", "segment a video or a folder of frames"),
    ("python -m sfc.demo", "sfc-demo", "the whole pipeline on synthetic domains (make demo)"),
    ("python -m sfc.bench", "sfc-bench", "speed and memory of the training steps"),
    ("python -m sfc.data.check", "", "decode every clip of a dataset, report broken files"),
    ("python -m sfc.data.synthetic", "", "write synthetic VIPER / Cityscapes-Seq / SYNTHIA-Seq "
                                         "trees (and Flying Chairs)"),
    ("python -m sfc.demo.gap", "", "the synthetic domain-gap experiment"),
]


def main() -> None:
    print("sfc — the commands (each takes --help):")
    w = max(len(c) for c, _, _ in COMMANDS)
    for cmd, script, what in COMMANDS:
        print(f"  {cmd:<{w}}  {what}" + (f"  [{script}]" if script else ""))
    print("Stage scripts: exp/**/script/*.sh; docs: README.md and docs/.")


if __name__ == "__main__":
    main()

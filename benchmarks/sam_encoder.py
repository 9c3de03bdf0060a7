"""The segmenter's image encoders: the lesson's teacher against the MobileSAM-style student, in one run.

    python benchmarks/sam_encoder.py

What distillation buys is encoder time (MobileSAM, Zhang et al. 2023: the image encoder is nearly all of
SAM's compute, and the decoder is reused unchanged). Both encoders are built untrained at the lesson's
sizes (`course.lessons.sam.Sizes`; speed does not depend on the weights) and timed on the same batch of
64 images, interleaved over rounds, minimum per encoder; a second identical teacher ("teacher#control")
shows how far apart two measurements of the same work land on this machine. Target: the student's
encoder at least 3x faster than the teacher's (its 1 block of width 32 against 4 of width 96 is about
40x fewer FLOPs per patch; the neck and the per-call overheads keep the measured ratio far lower).
The last line printed is one JSON object.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from course.device import machine_info  # noqa: E402
from course.lessons.sam import Sizes  # noqa: E402
from course.vision import data as vdata  # noqa: E402
from course.vision.sam import SAM, SAMConfig  # noqa: E402
from course.vision.vit import ViT, ViTConfig  # noqa: E402

TARGET = 3.0


@torch.no_grad()
def main(rounds: int = 10):
    sizes = Sizes()
    torch.manual_seed(0)
    cfg = SAMConfig(**sizes.teacher)
    student_vit = ViTConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, **sizes.student)
    models = {"teacher": SAM(cfg).eval(), "teacher#control": SAM(cfg).eval(),
              "student": SAM(cfg, encoder=ViT(student_vit)).eval()}
    images = vdata.stack_images(vdata.make_scenes(64, seed=5))
    best = {k: float("inf") for k in models}
    for _ in range(rounds):
        for name, m in models.items():
            t0 = time.perf_counter()
            m.embed_image(images)
            best[name] = min(best[name], time.perf_counter() - t0)
    ms = {k: 1000 * v / len(images) for k, v in best.items()}
    speedup = ms["teacher"] / ms["student"]
    out = {"benchmark": "sam_encoder", "machine": machine_info(), "threads": torch.get_num_threads(),
           "config": {"teacher": sizes.teacher, "student": sizes.student, "image_size": cfg.image_size, "batch": 64},
           "ms_per_image": ms, "encoder_params": {k: m.num_params("encoder") for k, m in models.items()},
           "control_ratio": ms["teacher#control"] / ms["teacher"],
           "targets": {"student_speedup": {"value": speedup, "target": TARGET, "ratio": speedup / TARGET,
                                           "met": speedup >= TARGET}}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Train a tiny Faster R-CNN on synthetic shapes, with torchvision as it ships and with rpn_ops patched in.

Both runs start from the same weights and see the same batches and random draws, so they print the same losses
step by step; the patched one spends less time in the region proposal network. CPU by default:

    python examples/train_tiny_faster_rcnn.py --steps 20 --batch-size 2
    python examples/train_tiny_faster_rcnn.py --device cuda
"""
import argparse
import copy
import math
import time
from typing import Dict, List, Tuple

import torch
from torch import Tensor
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

import rpn_ops

CLASSES = ("background", "rectangle", "ellipse")
COLORS = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.8, 0.3], [0.2, 0.3, 0.9], [0.9, 0.8, 0.1]])


def synthetic_sample(size: int, generator: torch.Generator) -> Tuple[Tensor, Dict[str, Tensor]]:
    """A noisy background with 1-4 coloured rectangles and ellipses; their boxes and labels (1, 2)."""
    image = 0.3 + 0.1 * torch.randn(3, size, size, generator=generator)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    boxes, labels = [], []
    for _ in range(int(torch.randint(1, 5, (1,), generator=generator))):
        w, h = (torch.randint(size // 8, size // 2, (2,), generator=generator)).tolist()
        x1 = int(torch.randint(0, size - w, (1,), generator=generator))
        y1 = int(torch.randint(0, size - h, (1,), generator=generator))
        label = int(torch.randint(1, len(CLASSES), (1,), generator=generator))
        if label == 1:
            mask = (xs >= x1) & (xs < x1 + w) & (ys >= y1) & (ys < y1 + h)
        else:
            cx, cy = x1 + w / 2, y1 + h / 2
            mask = ((xs + 0.5 - cx) / (w / 2)) ** 2 + ((ys + 0.5 - cy) / (h / 2)) ** 2 <= 1
        color = COLORS[int(torch.randint(0, len(COLORS), (1,), generator=generator))]
        image[:, mask] = color[:, None]
        boxes.append([x1, y1, x1 + w, y1 + h])
        labels.append(label)
    return image.clamp(0, 1), {"boxes": torch.tensor(boxes, dtype=torch.float32),
                               "labels": torch.tensor(labels, dtype=torch.int64)}


def synthetic_batches(steps: int, batch_size: int, size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [[synthetic_sample(size, generator) for _ in range(batch_size)] for _ in range(steps)]


class RegionTimer:
    """Seconds spent inside one submodule's forward (here the RPN), via forward hooks; on CUDA the queue is
    drained at both ends so that the time is the module's own."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.device, self.seconds, self._start = device, 0.0, 0.0
        module.register_forward_pre_hook(self._enter)
        module.register_forward_hook(self._exit)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _enter(self, module, inputs):
        self._sync()
        self._start = time.perf_counter()

    def _exit(self, module, inputs, outputs):
        self._sync()
        self.seconds += time.perf_counter() - self._start


def train(model, batches, device, seed: int) -> Tuple[List[Dict[str, float]], List[float], List[float]]:
    """SGD steps over the batches; per step the losses, the seconds taken and the seconds spent in the RPN."""
    model.to(device).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
    rpn_timer = RegionTimer(model.rpn, device)
    torch.manual_seed(seed)
    losses, seconds, rpn_seconds = [], [], []
    for batch in batches:
        images = [image.to(device) for image, _ in batch]
        targets = [{k: v.to(device) for k, v in target.items()} for _, target in batch]
        rpn_timer.seconds = 0.0
        start = time.perf_counter()
        loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
        rpn_seconds.append(rpn_timer.seconds)
        losses.append({k: v.item() for k, v in loss_dict.items()})
    return losses, seconds, rpn_seconds


def _median(values: List[float]) -> float:
    return sorted(values)[len(values) // 2]


def main(argv=None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=320, help="side of the square synthetic images")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for PyTorch (default: its own choice). PyTorch's multi-threaded CPU "
                             "training is not reproducible to the bit on a busy machine, torchvision's against "
                             "itself included; with 1 thread it is")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=len(CLASSES))
    patched = rpn_ops.patch_torchvision(copy.deepcopy(model))
    batches = synthetic_batches(args.steps, args.batch_size, args.image_size, args.seed)

    runs = {}
    for name, net in (("torchvision", model), ("rpn_ops", patched)):
        runs[name] = train(net, batches, device, args.seed + 1)
        for step, (losses, seconds, rpn_seconds) in enumerate(zip(*runs[name])):
            total = sum(losses.values())
            parts = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
            print(f"{name:12s} step {step:3d}  loss={total:.4f}  {parts}  step {seconds * 1e3:7.1f} ms"
                  f"  (RPN forward {rpn_seconds * 1e3:6.1f} ms)", flush=True)

    same = runs["torchvision"][0] == runs["rpn_ops"][0]
    step_ms = {name: _median(seconds) * 1e3 for name, (_, seconds, _) in runs.items()}
    rpn_ms = {name: _median(rpn_seconds) * 1e3 for name, (_, _, rpn_seconds) in runs.items()}
    print(f"median step: torchvision {step_ms['torchvision']:.1f} ms, rpn_ops {step_ms['rpn_ops']:.1f} ms "
          f"({step_ms['torchvision'] / step_ms['rpn_ops']:.2f}x); median RPN forward: torchvision "
          f"{rpn_ms['torchvision']:.1f} ms, rpn_ops {rpn_ms['rpn_ops']:.1f} ms "
          f"({rpn_ms['torchvision'] / rpn_ms['rpn_ops']:.2f}x); same losses: {same}")
    final = sum(runs["rpn_ops"][0][-1].values())
    if not math.isfinite(final):
        raise SystemExit(f"the loss diverged: {final}")
    return dict(same_losses=same, step_ms=step_ms, rpn_ms=rpn_ms, runs=runs)


if __name__ == "__main__":
    main()

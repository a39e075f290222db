"""Retrofit stochastic depth into torchvision's ResNet-50 (random weights) and prove eval equivalence."""

import time

import torch
import torchvision

import sdsurgery


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    start = time.perf_counter()
    retrofitted = sdsurgery.apply_stochastic_depth(model, p_max=0.2)
    seconds = time.perf_counter() - start

    for site in sdsurgery.find_residual_sites(model, p_max=0.2):
        print(f"depth {site.depth:2d}  {site.block_path:10s}  {site.shortcut:10s}  p={site.drop_rate:.3f}")
    print(f"surgery: {seconds:.2f} s")
    print(sdsurgery.verify(model, retrofitted).summary())


if __name__ == "__main__":
    main()

"""Retrofit stochastic depth into torchvision's ResNet-50 and train it a few steps on synthetic data.

Run: python examples/retrofit_resnet50.py   (CPU, random weights, well under a minute)

The same retrofit from the command line, with a verified checkpoint that ``sdsurgery.load`` reads back:
    sdsurgery apply torchvision:resnet50 --p-max 0.2 --input-size 3,64,64 -o resnet50-sd.pt
"""

import torch
import torchvision

import sdsurgery

torch.manual_seed(0)
NUM_CLASSES, BATCH, SIZE, STEPS = 10, 8, 64, 5

model = torchvision.models.resnet50(weights=None, num_classes=NUM_CLASSES)  # or load your own weights here
example = torch.randn(2, 3, SIZE, SIZE)

retrofitted = sdsurgery.apply_stochastic_depth(model, p_max=0.2, example_inputs=example)
report = sdsurgery.verify(model, retrofitted, example)
print(f"{len(sdsurgery.find_residual_sites(model, 0.2))} residual sites; {report.summary()}")
assert report.ok

# Nothing else changes: same class, same state_dict keys, an ordinary training loop.
assert type(retrofitted) is type(model) and retrofitted.state_dict().keys() == model.state_dict().keys()
optimizer = torch.optim.AdamW(retrofitted.parameters(), lr=1e-3)
x = torch.randn(BATCH, 3, SIZE, SIZE)  # one synthetic batch, fitted a few steps: the loss should fall
y = torch.randint(0, NUM_CLASSES, (BATCH,))

retrofitted.train()
for step in range(STEPS):
    loss = torch.nn.functional.cross_entropy(retrofitted(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step}: loss {loss.item():.4f}")

rates = [m.p for m in retrofitted.modules() if isinstance(m, sdsurgery.StochasticDepth)]
print(f"drop rates by depth: {', '.join(f'{p:.3f}' for p in rates)}")

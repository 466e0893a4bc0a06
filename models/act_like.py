"""act-like: a policy of the other common shape, beside tiny-pi, so the export and the host's
steps are tried on both: one camera the host normalises (FP32, NCHW, ImageNet statistics in
`model.toml`, as ACT and Diffusion Policy checkpoints ship them), the instruction as UTF-8
bytes without a mask, the state and the action in robot units (no statistics), no noise,
and a chunk of 10 steps x 6 dofs at a 50 ms control period. Random weights from a fixed
seed. The tests export it into a temporary directory (`models/export.py`, TorchScript) and
compare the appliance's answers with its reference.json; nothing ships it.
"""

import torch
from torch import nn

NAME = "act-like"
SEED = 20261203
HEIGHT, WIDTH = 96, 128
TOKENS = 24
STATE = 6
HORIZON, DOF = 10, 6

MODEL_TOML = f"""# act-like: one host-normalised camera, UTF-8 bytes, no statistics (models/act_like.py).
name = "{{name}}"
version = "1"
platform = "{{platform}}"
device = "{{device}}"
max_batch_size = 8

[[inputs]]
name = "image"
dtype = "FP32"
dims = [-1, 3, {HEIGHT}, {WIDTH}]

[[inputs]]
name = "instruction"
dtype = "INT64"
dims = [-1, {TOKENS}]

[[inputs]]
name = "qpos"
dtype = "FP32"
dims = [-1, {STATE}]

[[outputs]]
name = "chunk"
dtype = "FP32"
dims = [-1, {HORIZON}, {DOF}]

[[cameras]]
name = "top"
input = "image"
height = {HEIGHT}
width = {WIDTH}
layout = "nchw"
dtype = "FP32"
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]

[tokenizer]
encoding = "utf8-bytes"
ids_input = "instruction"
truncation = "truncate"

[state]
input = "qpos"

[action]
output = "chunk"
dof = {DOF}
horizon = {HORIZON}
dt_ms = 50
kind = "joint_position"
"""


class ActLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=4, padding=2),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.embed = nn.Embedding(256, 16)
        self.qpos = nn.Linear(STATE, 32)
        self.head = nn.Linear(32 + 16 + 32, HORIZON * DOF)

    def forward(self, image, instruction, qpos):
        vision = self.encoder(image).mean(dim=(2, 3))
        text = self.embed(instruction).mean(1)
        h = torch.cat([vision, text, torch.relu(self.qpos(qpos))], dim=1)
        return qpos.unsqueeze(1) + 0.1 * torch.tanh(self.head(h)).view(-1, HORIZON, DOF)


def build(vocab: int) -> nn.Module:
    torch.manual_seed(SEED)
    return ActLike().eval()


def inputs(batch: int, generator: torch.Generator, vocab: int) -> dict:
    """Example inputs in forward order, as the host would feed them."""
    return {
        "image": torch.randn((batch, 3, HEIGHT, WIDTH), generator=generator),
        "instruction": torch.randint(0, 256, (batch, TOKENS), dtype=torch.int64, generator=generator),
        "qpos": torch.randn((batch, STATE), generator=generator),
    }

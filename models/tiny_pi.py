"""tiny-pi: a small stand-in for the policies robot teams deploy (pi0/openpi, ACT, SmolVLA):
two named cameras (base and wrist, raw UINT8 frames normalised inside the model), a subword
(BPE) tokenizer with an attention mask, a 14-dimensional state normalised with the statistics
shipped beside the checkpoint, a noise input (flow matching starts from noise), and action
chunks of 50 steps x 14 dofs at a 20 ms control period, normalised (the host brings them back
to robot units), a robot-supplied extra input (the goal position) and an extra output (the
task's progress). Weights are random from a fixed seed: real forwards, meaningless actions.

Exported by `models/export.py` (see models/README.md); this file is its spec:
NAME, MODEL_TOML, build(), inputs(batch, generator), tokenizer(path).
"""

import torch
from torch import nn

NAME = "tiny-pi"
SEED = 20261201
HEIGHT, WIDTH = 224, 224
TOKENS = 32
STATE = 14
HORIZON, DOF = 50, 14

# Normalisation statistics "shipped with the checkpoint" (made up, but not trivial).
STATE_MEAN = [0.1 * (i - 7) for i in range(STATE)]
STATE_STD = [0.5 + 0.05 * i for i in range(STATE)]
ACTION_MEAN = [0.02 * (i - 7) for i in range(DOF)]
ACTION_STD = [0.2 + 0.01 * i for i in range(DOF)]


def _floats(values):
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


MODEL_TOML = f"""# tiny-pi: two cameras, a BPE tokenizer, normalised state and action chunks (models/tiny_pi.py).
name = "{{name}}"
version = "1"
platform = "{{platform}}"
device = "{{device}}"
max_batch_size = 16

[batching]
enabled = true
max_queue_delay_us = 0
preferred_batch_sizes = [4, 8]
queue_capacity = 256
instances = 1
default_deadline_ms = 1000

# The forward's arguments, in order.
[[inputs]]
name = "base"
dtype = "UINT8"
dims = [-1, {HEIGHT}, {WIDTH}, 3]

[[inputs]]
name = "wrist"
dtype = "UINT8"
dims = [-1, {HEIGHT}, {WIDTH}, 3]

[[inputs]]
name = "tokens"
dtype = "INT64"
dims = [-1, {TOKENS}]

[[inputs]]
name = "mask"
dtype = "INT64"
dims = [-1, {TOKENS}]

[[inputs]]
name = "state"
dtype = "FP32"
dims = [-1, {STATE}]

[[inputs]]
name = "goal"
dtype = "FP32"
dims = [-1, 3]

[[inputs]]
name = "noise"
dtype = "FP32"
dims = [-1, {HORIZON}, {DOF}]

[[outputs]]
name = "actions"
dtype = "FP32"
dims = [-1, {HORIZON}, {DOF}]

[[outputs]]
name = "progress"
dtype = "FP32"
dims = [-1, 1]

[[cameras]]
name = "base"
input = "base"
height = {HEIGHT}
width = {WIDTH}
layout = "nhwc"
dtype = "UINT8"

[[cameras]]
name = "wrist"
input = "wrist"
height = {HEIGHT}
width = {WIDTH}
layout = "nhwc"
dtype = "UINT8"

[tokenizer]
file = "tokenizer.json"
ids_input = "tokens"
mask_input = "mask"
max_length = {TOKENS}
truncation = "error"

[state]
input = "state"
mean = {_floats(STATE_MEAN)}
std = {_floats(STATE_STD)}

[[noise]]
input = "noise"
distribution = "normal"

# A robot-supplied input: where the task's target is, metres in the base frame; zeros when
# the robot sends none.
[[extra_inputs]]
name = "goal"
input = "goal"
required = false

[action]
output = "actions"
dof = {DOF}
horizon = {HORIZON}
dt_ms = 20
kind = "joint_position"
mean = {_floats(ACTION_MEAN)}
std = {_floats(ACTION_STD)}
"""


class TinyPi(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        # One encoder for both cameras; ImageNet normalisation inside the model.
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 24, 5, stride=4, padding=2),
            nn.ReLU(),
            nn.Conv2d(24, 48, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(48, 64, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.embed = nn.Embedding(vocab, 64)
        self.state = nn.Linear(STATE, 64)
        self.goal = nn.Linear(3, 64)
        self.trunk = nn.Sequential(nn.Linear(64 * 5, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU())
        self.head = nn.Linear(512, HORIZON * DOF)
        self.progress = nn.Linear(512, 1)

    def vision(self, frame):
        x = frame.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        x = self.encoder((x - self.mean) / self.std)
        return x.mean(dim=(2, 3))

    def forward(self, base, wrist, tokens, mask, state, goal, noise):
        m = mask.to(torch.float32).unsqueeze(-1)
        text = (self.embed(tokens) * m).sum(1) / m.sum(1).clamp(min=1.0)
        parts = [self.vision(base), self.vision(wrist), text, torch.relu(self.state(state)), torch.relu(self.goal(goal))]
        h = torch.cat(parts, dim=1)
        h = self.trunk(h)
        chunk = torch.tanh(self.head(h)).view(-1, HORIZON, DOF) + 0.1 * noise
        return chunk, torch.sigmoid(self.progress(h))


# Instructions a cell's robots are given: what the tokenizer is trained on.
CORPUS = [
    "pick up the red block",
    "pick up the blue block and place it in the left bin",
    "place the cup on the tray",
    "open the drawer",
    "close the drawer",
    "fold the towel",
    "stack the green block on the yellow block",
    "move the arm to the home position",
    "insert the peg into the hole",
    "wipe the table",
    "hand the tool to the operator",
    "sort the parts by colour",
    "stop",
    "halt",
    "emergency stop",
]


def tokenizer(path: str) -> None:
    """Trains a small BPE tokenizer on CORPUS and saves it (tokenizer.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["[PAD]", "[UNK]"], min_frequency=1)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.save(path)


def build(vocab: int) -> nn.Module:
    torch.manual_seed(SEED)
    return TinyPi(vocab).eval()


def inputs(batch: int, generator: torch.Generator, vocab: int) -> dict:
    """Example inputs in forward order (noise included), as the host would feed them."""
    return {
        "base": torch.randint(0, 256, (batch, HEIGHT, WIDTH, 3), dtype=torch.uint8, generator=generator),
        "wrist": torch.randint(0, 256, (batch, HEIGHT, WIDTH, 3), dtype=torch.uint8, generator=generator),
        "tokens": torch.randint(0, vocab, (batch, TOKENS), dtype=torch.int64, generator=generator),
        "mask": torch.ones((batch, TOKENS), dtype=torch.int64),
        "state": torch.randn((batch, STATE), generator=generator),
        "goal": torch.randn((batch, 3), generator=generator),
        "noise": torch.randn((batch, HORIZON, DOF), generator=generator),
    }

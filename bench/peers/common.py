"""What both Python peers share: the model (the same TorchScript file the appliance serves),
its preprocessing (as the appliance does it: JPEG decode, bilinear resize to the camera's size,
ImageNet normalisation, UTF-8 bytes as token ids, the state as sent) and the answer's shape
(the appliance's `/v1/inference` answer, so the bench's load generator reads all three alike).

Only models shaped like the demo (one FP32 NCHW camera, `utf8-bytes` tokens, a state vector,
one action output) are served: `tiny-vla` and the compute-bound stand-in `conv-vla`.
"""

import argparse
import base64
import io
import os
import time
import tomllib
import uuid

import numpy as np
import torch
from PIL import Image


def arguments(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model-dir", required=True, help="a model directory: model.toml + model.pt")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True, help="PEM certificate (HTTPS)")
    p.add_argument("--key", required=True, help="PEM private key")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--batch-timeout-ms", type=float, default=2.0,
                   help="how long a batch waits for company (the style of the reference system)")
    return p.parse_args()


class Model:
    def __init__(self, model_dir, threads):
        if threads > 0:
            torch.set_num_threads(threads)
        with open(os.path.join(model_dir, "model.toml"), "rb") as f:
            spec = tomllib.load(f)
        self.name = spec["name"]
        self.version = str(spec.get("version", "1"))
        camera = spec["cameras"][0]
        self.width, self.height = camera["width"], camera["height"]
        self.mean = np.array(camera["mean"], dtype=np.float32).reshape(3, 1, 1)
        self.std = np.array(camera["std"], dtype=np.float32).reshape(3, 1, 1)
        inputs = {i["name"]: i for i in spec["inputs"]}
        self.tokens = inputs[spec["tokenizer"]["ids_input"]]["dims"][1]
        self.state_dim = inputs[spec["state"]["input"]]["dims"][1]
        self.module = torch.jit.load(os.path.join(model_dir, "model.pt"), map_location="cpu").eval()
        with torch.inference_mode():
            for n in (1, 8):
                self.forward(*[np.zeros((n, *s), dtype=d) for s, d in self.sample_shapes()])

    def sample_shapes(self):
        return [((3, self.height, self.width), np.float32), ((self.tokens,), np.int64), ((self.state_dim,), np.float32)]

    def preprocess(self, body):
        """One request's JSON → (image, tokens, state) arrays, or ValueError naming the field."""
        image = body.get("image")
        if image is None and isinstance(body.get("images"), dict) and body["images"]:
            image = next(iter(body["images"].values()))
        if not isinstance(image, str):
            raise ValueError("image: a base64 JPEG or PNG is required")
        rgb = Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB")
        if rgb.size != (self.width, self.height):
            rgb = rgb.resize((self.width, self.height), Image.BILINEAR)
        x = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0
        x = (x - self.mean) / self.std
        ids = list(str(body.get("instruction", "")).encode("utf-8"))[: self.tokens]
        tokens = np.zeros(self.tokens, dtype=np.int64)
        tokens[: len(ids)] = ids
        state = np.asarray(body.get("state", []), dtype=np.float32)
        if state.shape != (self.state_dim,):
            raise ValueError(f"state: {self.state_dim} values expected, got {state.size}")
        return x, tokens, state

    def forward(self, images, tokens, states):
        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(tokens), torch.from_numpy(states))
        return out.numpy()

    def answer(self, action, timing):
        action = [float(v) for v in action]
        return {
            "request_id": str(uuid.uuid4()),
            "model": self.name,
            "model_version": self.version,
            "action": action,
            "actions": [action],
            "timing": timing,
            "policy": {"decision": "allow", "policies": []},
        }


def now_ms():
    return time.perf_counter() * 1e3

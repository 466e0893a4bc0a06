"""Exports a PyTorch policy into model directories the appliance serves, and checks them.

    python models/export.py SPEC.py OUT_DIR [--formats aoti,torchscript] [--device cpu|cuda] [--threads N]

SPEC.py describes the policy (see models/tiny_pi.py): NAME, MODEL_TOML (with `{name}`,
`{platform}` and `{device}` left to fill), build(vocab) -> nn.Module, inputs(batch, generator,
vocab) -> the forward's inputs by name, and optionally tokenizer(path), which writes
tokenizer.json. It writes, under OUT_DIR:

- NAME/       model.toml (platform pytorch_aoti) + model.pt2, a torch.export/AOTInductor package
- NAME-ts/    model.toml (platform pytorch_torchscript) + model.pt, a traced TorchScript module

each with the tokenizer beside it, and checks that each artefact, loaded back, gives the
eager module's outputs (max |diff| < 1e-4) at batch sizes 1 and 3. NAME/reference.json then
holds requests as a robot would send them (raw rgb8 frames, an instruction, the state, a
noise seed) with the outputs PyTorch computes for them through the same host steps
(tokenizer, state and action normalisation, the noise generator): the appliance's tests
compare its answers with these.
"""

import argparse
import base64
import importlib.util
import json
import math
import os
import sys
import tomllib

import torch

MASK64 = (1 << 64) - 1
TOLERANCE = 1e-4


def load_spec(path):
    spec = importlib.util.spec_from_file_location("policy_spec", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def host_noise(seed, count):
    """The appliance's noise generator (appliance/src/noise.rs): SplitMix64, Box-Muller."""
    state = seed & MASK64

    def next_u64():
        nonlocal state
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    out = []
    while len(out) < count:
        u1 = ((next_u64() >> 11) + 1) * 2.0**-53
        u2 = (next_u64() >> 11) * 2.0**-53
        r = math.sqrt(-2.0 * math.log(u1))
        out.append(r * math.cos(2.0 * math.pi * u2))
        out.append(r * math.sin(2.0 * math.pi * u2))
    return out[:count]


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def as_tuple(outputs):
    return outputs if isinstance(outputs, (tuple, list)) else (outputs,)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec")
    p.add_argument("out")
    p.add_argument("--formats", default="aoti,torchscript")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    # The appliance's default (models.cpu_threads = 0) runs CPU forwards on cores - 1 threads.
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                   help="OpenMP threads the AOTInductor CPU kernels are compiled for "
                        "(default: cores - 1, the appliance's models.cpu_threads default)")
    args = p.parse_args()
    formats = args.formats.split(",")
    spec = load_spec(args.spec)
    # AOTInductor compiles CPU kernels for torch's thread count at export time.
    torch.set_num_threads(max(1, args.threads))

    work = os.path.join(args.out, ".work")
    os.makedirs(work, exist_ok=True)
    tokenizer_path = os.path.join(work, "tokenizer.json")
    vocab = 256
    if hasattr(spec, "tokenizer"):
        spec.tokenizer(tokenizer_path)
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(tokenizer_path).get_vocab_size()
    device = torch.device(args.device)
    model = spec.build(vocab).to(device)
    g = torch.Generator().manual_seed(7)
    example = {k: v.to(device) for k, v in spec.inputs(2, g, vocab).items()}
    names = list(example)
    checks = [{k: v.to(device) for k, v in spec.inputs(n, g, vocab).items()} for n in (1, 3)]
    with torch.no_grad():
        expected = [as_tuple(model(*c.values())) for c in checks]

    dirs = {}
    for fmt in formats:
        name = spec.NAME if fmt == "aoti" else f"{spec.NAME}-ts"
        platform = "pytorch_aoti" if fmt == "aoti" else "pytorch_torchscript"
        out = os.path.join(args.out, name)
        os.makedirs(out, exist_ok=True)
        if fmt == "aoti":
            batch = torch.export.Dim("batch", min=1, max=64)
            dynamic = {k: {0: batch} for k in names}
            program = torch.export.export(model, tuple(example.values()), dynamic_shapes=dynamic)
            package = os.path.join(out, "model.pt2")
            torch._inductor.aoti_compile_and_package(program, package_path=package)
            loaded = torch._inductor.aoti_load_package(package)
            run = lambda c: as_tuple(loaded(*c.values()))  # noqa: E731
        elif fmt == "torchscript":
            with torch.no_grad():
                traced = torch.jit.trace(model, tuple(example.values()))
            traced.save(os.path.join(out, "model.pt"))
            loaded = torch.jit.load(os.path.join(out, "model.pt"), map_location=device)
            run = lambda c: as_tuple(loaded(*c.values()))  # noqa: E731
        else:
            sys.exit(f"unknown format {fmt!r}: aoti or torchscript")
        with torch.no_grad():
            for c, want in zip(checks, expected):
                diff = max_diff(run(c), want)
                if diff >= TOLERANCE:
                    sys.exit(f"{name}: the exported model differs from PyTorch's by {diff:.3g}")
        # A package runs on the device it was compiled for; a TorchScript module anywhere.
        placed = ("cuda:0" if args.device == "cuda" else "cpu") if fmt == "aoti" else "auto"
        toml = spec.MODEL_TOML.format(name=name, platform=platform, device=placed)
        with open(os.path.join(out, "model.toml"), "w") as f:
            f.write(toml)
        if os.path.exists(tokenizer_path):
            with open(tokenizer_path, "rb") as src, open(os.path.join(out, "tokenizer.json"), "wb") as dst:
                dst.write(src.read())
        dirs[fmt] = out
        print(f"{name}: {platform} exported to {out}, matches PyTorch (|diff| < {TOLERANCE})")

    write_reference(spec, model, tokenizer_path, dirs, device)


def host_tokens(toml, tokenizer, instruction):
    """The host's text step (appliance/src/text.rs): ids padded to the ids input's length, and
    the mask; UTF-8 bytes without a tokenizer file."""
    tok = toml["tokenizer"]
    length = input_dims(toml, tok["ids_input"])[1]
    if tokenizer is None:
        ids, pad = list(instruction.encode("utf-8")), 0
    else:
        ids = tokenizer.encode(instruction).ids
        pad = tok.get("pad_id")
        if pad is None:
            pad = next((tokenizer.token_to_id(p) for p in ("[PAD]", "<pad>", "<|pad|>") if tokenizer.token_to_id(p) is not None), 0)
    if len(ids) > length and tok.get("truncation", "error") == "error":
        sys.exit(f"reference instruction {instruction!r} has {len(ids)} tokens, more than {length}: the host would refuse it (truncation = \"error\")")
    ids = ids[:length]
    mask = [1] * len(ids) + [0] * (length - len(ids))
    return ids + [pad] * (length - len(ids)), mask


def input_dims(toml, name):
    return next(i["dims"] for i in toml["inputs"] if i["name"] == name)


def host_frame(camera, frame):
    """The host's camera step (appliance/src/preprocess.rs) on an HWC uint8 frame of the
    camera's size: UINT8 as it is, FP32 normalised with the camera's mean and std; NCHW or NHWC."""
    x = frame
    if camera.get("dtype", "FP32") == "FP32":
        # The host's defaults are ImageNet's (appliance/src/spec.rs).
        mean = torch.tensor(camera.get("mean", [0.485, 0.456, 0.406]))
        std = torch.tensor(camera.get("std", [0.229, 0.224, 0.225]))
        x = (frame.float() / 255.0 - mean) / std
    if camera.get("layout", "nchw") == "nchw":
        x = x.permute(2, 0, 1)
    return x.contiguous()


def write_reference(spec, model, tokenizer_path, dirs, device):
    """Requests as robots send them, and what PyTorch answers through the host's own steps:
    each camera's normalisation and layout, the tokenizer (or UTF-8 bytes) with its mask, the
    state's and the action's statistics when the model ships them, the noise inputs from the
    request's seed, the extra inputs."""
    toml = tomllib.loads(spec.MODEL_TOML.format(name=spec.NAME, platform="x", device="cpu"))
    cameras = toml.get("cameras", [])
    tok = toml.get("tokenizer")
    state_spec, action = toml["state"], toml["action"]
    horizon, dof = action.get("horizon", 1), action["dof"]
    tokenizer = None
    if tok is not None and tok.get("file"):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(tokenizer_path)
    state_len = input_dims(toml, state_spec["input"])[1]
    noise_inputs = [n["input"] for n in toml.get("noise", [])]
    g = torch.Generator().manual_seed(11)
    instructions = ["pick up the red block", "fold the towel and place it in the left bin", "stop"]
    cases = []
    for rows in (1, 3):
        requests, feeds = [], []
        for r in range(rows):
            frames = {c["name"]: torch.randint(0, 256, (c["height"], c["width"], 3), dtype=torch.uint8, generator=g) for c in cameras}
            state = torch.randn(state_len, generator=g)
            instruction = instructions[r % len(instructions)]
            # Consecutive per batch: an OIP request's `seed` parameter gives row r seed + r.
            seed = 1000 * rows + r
            feed = {c["input"]: host_frame(c, frames[c["name"]]).unsqueeze(0) for c in cameras}
            if tok is not None:
                ids, mask = host_tokens(toml, tokenizer, instruction)
                feed[tok["ids_input"]] = torch.tensor([ids])
                if tok.get("mask_input"):
                    feed[tok["mask_input"]] = torch.tensor([mask])
            normalised = state
            if "mean" in state_spec:
                normalised = (state - torch.tensor(state_spec["mean"])) / torch.tensor(state_spec["std"])
            feed[state_spec["input"]] = normalised.unsqueeze(0)
            # One draw per row, continued across its noise inputs in input order (noise.rs).
            ordered = [i["name"] for i in toml["inputs"] if i["name"] in noise_inputs]
            sizes = [math.prod(input_dims(toml, n)[1:]) for n in ordered]
            values = torch.tensor(host_noise(seed, sum(sizes)), dtype=torch.float64).to(torch.float32)
            for n, part in zip(ordered, torch.split(values, sizes) if sizes else []):
                feed[n] = part.view(1, *input_dims(toml, n)[1:])
            extra = {}
            for x in toml.get("extra_inputs", []):
                spec_in = next(i for i in toml["inputs"] if i["name"] == x["input"])
                if spec_in["dtype"] == "FP32":
                    value = torch.randn(spec_in["dims"][1:], generator=g)
                else:
                    value = torch.randint(0, 4, spec_in["dims"][1:], generator=g)
                feed[x["input"]] = value.unsqueeze(0)
                extra[x["name"]] = value.tolist()
            feeds.append(feed)
            request = {
                "images": {n: {"encoding": "rgb8", "width": f.shape[1], "height": f.shape[0], "data": base64.b64encode(f.numpy().tobytes()).decode()} for n, f in frames.items()},
                "instruction": instruction,
                "state": state.tolist(),
                "extra": extra,
            }
            if noise_inputs:
                request["seed"] = seed
            requests.append(request)
        names = [i["name"] for i in toml["inputs"]]
        batch = [torch.cat([f[n] for f in feeds]).to(device) for n in names]
        with torch.no_grad():
            outs = as_tuple(model(*batch))
        out_names = [o["name"] for o in toml["outputs"]]
        expected = []
        for r in range(rows):
            row = {}
            for n, t in zip(out_names, outs):
                v = t[r].cpu()
                if n == action["output"] and "mean" in action:
                    v = v.reshape(horizon, dof) * torch.tensor(action["std"]) + torch.tensor(action["mean"])
                row[n] = v.reshape(-1).tolist()
            expected.append(row)
        cases.append({"requests": requests, "outputs": expected})
    for out in dirs.values():
        with open(os.path.join(out, "reference.json"), "w") as f:
            json.dump({"tolerance": TOLERANCE, "cases": cases}, f)


if __name__ == "__main__":
    main()

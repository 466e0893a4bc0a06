"""Drives tiny-pi and tiny-pi-ts with Triton's own Python client (tritonclient[http]).

Run by tests/models.rs: python tritonclient_pi.py URL CA_PEM API_KEY REFERENCE_JSON
Sends the reference's 3-row case as a robot team's script would: both cameras as UINT8
arrays, the instructions as BYTES text (the appliance tokenizes them), state and goal as FP32,
the noise seed as a request parameter; prints, per model, the largest difference from the
actions PyTorch computed, as JSON.
"""

import base64
import json
import sys

import numpy as np
import tritonclient.http as httpclient

url, ca, key, reference = sys.argv[1:5]
case = json.load(open(reference))["cases"][1]
rows = case["requests"]
client = httpclient.InferenceServerClient(url=url, ssl=True, ssl_options={"ca_certs": ca})


def frames(camera):
    return np.stack([
        np.frombuffer(base64.b64decode(r["images"][camera]["data"]), dtype=np.uint8).reshape(224, 224, 3)
        for r in rows
    ])


arrays = [
    ("base", frames("base"), "UINT8"),
    ("wrist", frames("wrist"), "UINT8"),
    ("tokens", np.array([r["instruction"].encode() for r in rows], dtype=np.object_), "BYTES"),
    ("state", np.array([r["state"] for r in rows], dtype=np.float32), "FP32"),
    ("goal", np.array([r["extra"]["goal"] for r in rows], dtype=np.float32), "FP32"),
]
want = np.array([o["actions"] for o in case["outputs"]], dtype=np.float64).reshape(len(rows), 50, 14)

seen = {}
for model in ["tiny-pi", "tiny-pi-ts"]:
    inputs = []
    for name, array, datatype in arrays:
        tensor = httpclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=True)
        inputs.append(tensor)
    result = client.infer(
        model,
        inputs,
        outputs=[httpclient.InferRequestedOutput("actions", binary_data=True)],
        parameters={"seed": rows[0]["seed"]},
        headers={"X-API-Key": key},
    )
    actions = result.as_numpy("actions")
    seen[model] = {"shape": list(actions.shape), "max_abs_diff": float(np.abs(actions - want).max())}
print(json.dumps(seen))

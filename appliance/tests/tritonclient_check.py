"""Drives the appliance with Triton's own Python client (tritonclient[http]) over HTTPS.

Run by tests/oip.rs: python tritonclient_check.py URL CA_PEM API_KEY MODEL TENSOR_DIR
TENSOR_DIR holds the preprocessed inputs as raw little-endian files (image.f32,
instruction.i64, state.f32). Prints one JSON object with what the client saw.
"""

import json
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

url, ca, key, model, tensors = sys.argv[1:6]
KEY = {"X-API-Key": key}


def auth():
    # tritonclient adds its own headers (Inference-Header-Content-Length) to the dict it is
    # given, so each call gets a fresh one.
    return dict(KEY)


client = httpclient.InferenceServerClient(url=url, ssl=True, ssl_options={"ca_certs": ca})

seen = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready(model, headers=auth()),
    "unknown_model_ready": client.is_model_ready("no-such-model", headers=auth()),
    "metadata": client.get_model_metadata(model, headers=auth()),
}

arrays = {
    "image": np.fromfile(f"{tensors}/image.f32", dtype="<f4").reshape(1, 3, 224, 224),
    "instruction": np.fromfile(f"{tensors}/instruction.i64", dtype="<i8").reshape(1, 32),
    "state": np.fromfile(f"{tensors}/state.f32", dtype="<f4").reshape(1, 7),
}


def tensors(binary):
    inputs = []
    for name, datatype in [("image", "FP32"), ("instruction", "INT64"), ("state", "FP32")]:
        tensor = httpclient.InferInput(name, list(arrays[name].shape), datatype)
        tensor.set_data_from_numpy(arrays[name], binary_data=binary)
        inputs.append(tensor)
    return inputs


result = client.infer(
    model,
    tensors(binary=True),
    outputs=[httpclient.InferRequestedOutput("action", binary_data=True)],
    request_id="triton-42",
    headers=auth(),
)
seen["binary_action"] = result.as_numpy("action").reshape(-1).tolist()
seen["id"] = result.get_response()["id"]

# The same inputs as JSON tensors, asking for a JSON output.
result = client.infer(
    model,
    tensors(binary=False),
    outputs=[httpclient.InferRequestedOutput("action", binary_data=False)],
    headers=auth(),
)
seen["json_action"] = result.as_numpy("action").reshape(-1).tolist()

try:
    client.infer(model, tensors(binary=True))
    seen["without_key"] = "accepted"
except InferenceServerException as e:
    seen["without_key"] = str(e)

print(json.dumps(seen))

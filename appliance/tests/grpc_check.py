"""Drives the appliance's OIP gRPC service with Triton's own client (tritonclient[grpc]) over TLS.

Run by tests/grpc.rs: python grpc_check.py HOST:PORT CA_PEM KEY SPENT_KEY ADMIN_TOKEN REFERENCE_JSON
KEY is a robot's key, SPENT_KEY a robot whose day quota is 0. REFERENCE_JSON is tiny-pi's
reference (models/export.py): its 3-row case is sent as a robot team's script would, and the
actions compared with PyTorch's. Prints one JSON object with what the client saw.
"""

import base64
import json
import queue
import sys

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

url, ca, key, spent, admin, reference = sys.argv[1:7]
root = open(ca, "rb").read()
client = grpcclient.InferenceServerClient(url=url, ssl=True, root_certificates=ca)
KEY = {"x-api-key": key}
seen = {}


def error(call):
    try:
        call()
        return "accepted"
    except InferenceServerException as e:
        return {"status": e.status(), "message": e.message()}


seen["live"] = client.is_server_live()
seen["ready"] = client.is_server_ready()
seen["model_ready"] = client.is_model_ready("tiny-pi", headers=KEY)
seen["unknown_model_ready"] = client.is_model_ready("no-such-model", headers=KEY)
seen["server_metadata"] = client.get_server_metadata(headers=KEY, as_json=True)
seen["metadata"] = client.get_model_metadata("tiny-pi", headers=KEY, as_json=True)

# tiny-pi's reference case: two UINT8 cameras, BYTES instructions, state and goal, a seed.
case = json.load(open(reference))["cases"][1]
rows = case["requests"]
want = np.array([o["actions"] for o in case["outputs"]], dtype=np.float64).reshape(len(rows), 50, 14)


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


def inputs(state=None):
    out = []
    for name, array, datatype in arrays:
        if name == "state" and state is not None:
            array = state
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


result = client.infer(
    "tiny-pi",
    inputs(),
    outputs=[grpcclient.InferRequestedOutput("actions")],
    parameters={"seed": rows[0]["seed"]},
    request_id="grpc-7",
    headers=KEY,
)
actions = result.as_numpy("actions")
response = result.get_response(as_json=True)
seen["unary"] = {
    "shape": list(actions.shape),
    "max_abs_diff": float(np.abs(actions - want).max()),
    "id": response.get("id"),
    "policy": json.loads(response["parameters"]["policy"]["string_param"]),
    "timing": sorted(response["parameters"]),
}

# Errors: no key, a state of the wrong length, an unknown model, the admin token asking for
# actions, a spent quota.
seen["without_key"] = error(lambda: client.infer("tiny-pi", inputs(), parameters={"seed": 1}))
bad_state = np.zeros((len(rows), 5), dtype=np.float32)
seen["bad_state"] = error(lambda: client.infer("tiny-pi", inputs(state=bad_state), headers=KEY))
seen["unknown_model"] = error(lambda: client.infer("nope", inputs(), headers=KEY))
seen["admin_infer"] = error(
    lambda: client.infer("tiny-pi", inputs(), headers={"authorization": f"Bearer {admin}"})
)
seen["spent"] = error(lambda: client.infer("tiny-pi", inputs(), headers={"x-api-key": spent}))

# Streaming: three requests, the middle one bad; each answered in order, the stream stays open.
answers = queue.Queue()
client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=KEY)
client.async_stream_infer("tiny-pi", inputs(), request_id="s-1", parameters={"seed": rows[0]["seed"]})
client.async_stream_infer("tiny-pi", inputs(state=bad_state), request_id="s-2")
client.async_stream_infer("tiny-pi", inputs(), request_id="s-3", parameters={"seed": rows[0]["seed"]})
stream = []
for _ in range(3):
    result, err = answers.get(timeout=30)
    if err is not None:
        stream.append({"error": err.message()})
    else:
        got = result.as_numpy("actions")
        stream.append({
            "id": result.get_response().id,
            "max_abs_diff": float(np.abs(got - want).max()),
        })
client.stop_stream()
seen["stream"] = stream

# Typed contents (KServe clients that do not use raw_input_contents), through the raw stub:
# tiny-vla with its instruction as BYTES text.
channel = grpc.secure_channel(url, grpc.ssl_channel_credentials(root_certificates=root))
stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
request = service_pb2.ModelInferRequest(model_name="tiny-vla", id="typed")
image = request.inputs.add(name="image", datatype="FP32", shape=[1, 3, 224, 224])
image.contents.fp32_contents.extend([0.25] * (3 * 224 * 224))
text = request.inputs.add(name="instruction", datatype="BYTES", shape=[1])
text.contents.bytes_contents.append(b"pick up the red block")
state = request.inputs.add(name="state", datatype="FP32", shape=[1, 7])
state.contents.fp32_contents.extend([0.1, -0.2, 0.3, 0.0, 0.5, -0.1, 0.2])
typed = stub.ModelInfer(request, metadata=[("x-api-key", key)], timeout=30)
seen["typed"] = {
    "id": typed.id,
    "shape": list(typed.outputs[0].shape),
    "action": np.frombuffer(typed.raw_output_contents[0], dtype="<f4").tolist(),
}
# The same request with raw contents, through tritonclient.
raw_inputs = []
for name, array, datatype in [
    ("image", np.full((1, 3, 224, 224), 0.25, dtype=np.float32), "FP32"),
    ("instruction", np.array([b"pick up the red block"], dtype=np.object_), "BYTES"),
    ("state", np.array([[0.1, -0.2, 0.3, 0.0, 0.5, -0.1, 0.2]], dtype=np.float32), "FP32"),
]:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    raw_inputs.append(tensor)
seen["raw"] = client.infer("tiny-vla", raw_inputs, headers=KEY).as_numpy("action").reshape(-1).tolist()
# Both typed contents and raw data for one input: refused, naming it.
request.raw_input_contents.extend([b"", b"", b""])
try:
    stub.ModelInfer(request, metadata=[("x-api-key", key)], timeout=30)
    seen["typed_and_raw"] = "accepted"
except grpc.RpcError as e:
    seen["typed_and_raw"] = {"status": str(e.code()), "message": e.details()}
# A call the appliance does not serve (ModelConfig): UNIMPLEMENTED.
seen["model_config"] = error(lambda: client.get_model_config("tiny-pi", headers=KEY))

# Statistics, and the repository calls: the admin token only.
stats = client.get_inference_statistics("tiny-pi", headers=KEY, as_json=True)
seen["inference_count"] = int(stats["model_stats"][0].get("inference_count", 0))
ADMIN = {"authorization": f"Bearer {admin}"}
seen["index"] = client.get_model_repository_index(headers=ADMIN, as_json=True)
seen["index_as_robot"] = error(lambda: client.get_model_repository_index(headers=KEY))
client.unload_model("tiny-vla", headers=ADMIN)
seen["ready_after_unload"] = client.is_model_ready("tiny-vla", headers=KEY)
client.load_model("tiny-vla", headers=ADMIN)
seen["ready_after_load"] = client.is_model_ready("tiny-vla", headers=KEY)
print(json.dumps(seen))

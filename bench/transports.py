"""The three robot transports side by side, each driven by the client robot programs run.

Run by `bench transports` (bench/src/transports.rs) with .venv-clients' Python:
    python transports.py CONFIG_JSON
CONFIG_JSON: {"host", "port", "ca", "model", "robots": [[id, key], ...], "counts": [1, 32],
"seconds", "warmup_s", "reference"}. For each transport and robot count, that many processes
(one robot each, its own client and connection) send tiny-pi's reference observation in a
closed loop; prints one JSON object: per transport and count, requests, errors, req/s, p50, p99.

- `https`: the project's Python client (clients/python), `POST /v1/inference`, frames as raw
  rgb8 in JSON.
- `grpc`: tritonclient.grpc `infer`, frames as UINT8 tensors in raw_input_contents.
- `openpi`: openpi-client's WebsocketClientPolicy, frames as uint8 arrays in MessagePack.
"""

import base64
import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np


def observation(reference):
    row = json.load(open(reference))["cases"][0]["requests"][0]
    frames = {
        c: np.frombuffer(base64.b64decode(row["images"][c]["data"]), dtype=np.uint8).reshape(224, 224, 3)
        for c in ("base", "wrist")
    }
    goal = np.asarray(row["extra"]["goal"], dtype=np.float32)
    return frames, row["instruction"], np.asarray(row["state"], dtype=np.float32), goal


def make_call(transport, cfg, robot, key):
    frames, prompt, state, goal = observation(cfg["reference"])
    host, port, model = cfg["host"], cfg["port"], cfg["model"]
    if transport == "https":
        from vla_client import Client

        client = Client(f"https://{host}:{port}", robot_id=robot, api_key=key, ca_file=cfg["ca"], model=model,
                        retries=0)
        return lambda: client.infer(images=frames, instruction=prompt, state=state, extra={"goal": goal}).actions
    if transport == "grpc":
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(f"{host}:{port}", ssl=True, root_certificates=cfg["ca"])
        arrays = [
            ("base", frames["base"][None], "UINT8"),
            ("wrist", frames["wrist"][None], "UINT8"),
            ("tokens", np.array([prompt.encode()], dtype=np.object_), "BYTES"),
            ("state", state[None], "FP32"),
            ("goal", goal[None], "FP32"),
        ]
        inputs = []
        for name, array, datatype in arrays:
            tensor = grpcclient.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        headers = {"x-api-key": key}
        return lambda: client.infer(model, inputs, headers=headers).as_numpy("actions")
    if transport == "openpi":
        os.environ["SSL_CERT_FILE"] = cfg["ca"]
        from openpi_client.websocket_client_policy import WebsocketClientPolicy

        policy = WebsocketClientPolicy(f"wss://{host}:{port}/openpi/{model}", api_key=key)
        obs = {"observation/image": frames["base"], "observation/wrist_image": frames["wrist"],
               "observation/state": state, "observation/goal": goal, "prompt": prompt}
        return lambda: policy.infer(obs)["actions"]
    raise ValueError(transport)


def robot_loop(transport, cfg, robot, key, start_at, end_at, out):
    latencies, errors, first_error = [], 0, None
    try:
        call = make_call(transport, cfg, robot, key)
        while time.time() < start_at:  # connected and warm
            call()
        while time.time() < end_at:
            t0 = time.perf_counter()
            try:
                call()
                latencies.append((time.perf_counter() - t0) * 1000.0)
            except Exception as e:  # noqa: BLE001 - counted and reported, not hidden
                errors += 1
                first_error = first_error or f"{type(e).__name__}: {e}"[:300]
    except Exception as e:  # noqa: BLE001
        errors += 1
        first_error = first_error or f"{type(e).__name__}: {e}"[:300]
    out.put({"latencies": latencies, "errors": errors, "error": first_error})


def quantile(sorted_values, q):
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return round(sorted_values[i], 2)


def point(transport, cfg, n):
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    # Every robot connects first; the window opens for all at once, after the warm-up.
    start_at = time.time() + 3.0 + 0.15 * n + cfg["warmup_s"]
    end_at = start_at + cfg["seconds"]
    procs = [
        ctx.Process(target=robot_loop, args=(transport, cfg, robot, key, start_at, end_at, out))
        for robot, key in cfg["robots"][:n]
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=cfg["seconds"] + 120 + 0.15 * n) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    latencies = sorted(x for r in results for x in r["latencies"])
    errors = sum(r["errors"] for r in results)
    first_error = next((r["error"] for r in results if r.get("error")), None)
    return {
        "transport": transport,
        "robots": n,
        "requests": len(latencies),
        "errors": errors,
        "first_error": first_error,
        "rps": round(len(latencies) / cfg["seconds"], 1),
        "p50_ms": quantile(latencies, 0.5),
        "p99_ms": quantile(latencies, 0.99),
    }


def main():
    cfg = json.load(open(sys.argv[1]))
    points = []
    for n in cfg["counts"]:
        for transport in ("https", "grpc", "openpi"):
            p = point(transport, cfg, n)
            print(json.dumps(p), file=sys.stderr, flush=True)
            points.append(p)
    print(json.dumps({"points": points}))


if __name__ == "__main__":
    main()

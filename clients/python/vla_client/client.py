"""The appliance's robot endpoint (`POST /v1/inference`) from Python."""

import base64
import time
from dataclasses import dataclass, field

import numpy as np
import requests
from requests.adapters import HTTPAdapter

from . import errors

#: Statuses worth a retry after `Retry-After`: the request was refused before any work.
_RETRYABLE = {429, 503}


@dataclass
class Result:
    """One decision of the appliance."""

    #: The action chunk, float32 `[horizon, dof]`, in the robot's units (after every policy).
    actions: np.ndarray
    #: Where the time went on the appliance: total_ms, queue_ms, preprocess_ms, inference_ms,
    #: batch_size.
    timing: dict
    #: The policies' decision chain: `{"decision": "allow"|"modify", "policies": [...]}`.
    policy: dict
    model: str
    model_version: str
    request_id: str
    #: The control period of one step, ms (when the model declares it).
    dt_ms: float = None
    #: The noise seed the request ran with (models with noise inputs).
    seed: int = None
    #: The model's other outputs, by name.
    outputs: dict = field(default_factory=dict)
    #: The `RateLimit-*` headers of the answer (what is left of the robot's quota).
    rate_limit: dict = field(default_factory=dict)

    @property
    def action(self):
        """The first step of the chunk."""
        return self.actions[0]


class _PinnedAdapter(HTTPAdapter):
    """Trusts exactly the server certificate whose SHA-256 is `fingerprint`."""

    def __init__(self, fingerprint, **kwargs):
        self._fingerprint = fingerprint
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        kwargs["assert_fingerprint"] = self._fingerprint
        kwargs["cert_reqs"] = "CERT_NONE"
        kwargs["assert_hostname"] = False
        super().init_poolmanager(*args, **kwargs)


def _frame(camera, frame):
    """A camera frame as the robot endpoint takes it: JPEG/PNG bytes as base64, or uint8
    pixels `[H, W, 3]` (or `[3, H, W]`) as raw rgb8."""
    if isinstance(frame, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(frame)).decode()
    array = np.asarray(frame)
    if array.dtype != np.uint8:
        raise TypeError(f"camera {camera!r}: frames are uint8 pixels or encoded bytes, not {array.dtype}")
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[2] != 3:
        array = np.transpose(array, (1, 2, 0))
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"camera {camera!r}: pixels must be [H, W, 3] or [3, H, W], not {list(array.shape)}")
    height, width = array.shape[:2]
    data = base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()
    return {"encoding": "rgb8", "width": int(width), "height": int(height), "data": data}


def _retry_after(response):
    value = response.headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class Client:
    """A robot's connection to the appliance: one keep-alive HTTPS session, reused.

    `Client("https://cell-7.local:8443", robot_id="arm-1", api_key=KEY, ca_file="ca.pem")`, or
    `pin_sha256="AB:CD:…"` (the certificate fingerprint the appliance logs at start) instead of a
    CA file. With neither, the system's trust store is used; TLS is never unverified.

    Refusals that cost the appliance nothing (429, 503 with `Retry-After`) are retried after the
    time the appliance asks for, `retries` times at most and only while the wait stays within
    `max_retry_wait_s`; then the typed error is raised.
    """

    def __init__(self, url, robot_id, api_key, ca_file=None, pin_sha256=None, model=None, timeout_s=10.0,
                 retries=2, max_retry_wait_s=2.0):
        if ca_file and pin_sha256:
            raise ValueError("give ca_file or pin_sha256, not both")
        self.url = url.rstrip("/")
        self.robot_id = robot_id
        self.model = model
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_retry_wait_s = max_retry_wait_s
        self._session = requests.Session()
        # Passed with every request: a session-level `verify` loses to REQUESTS_CA_BUNDLE and
        # CURL_CA_BUNDLE in requests, and the appliance's CA or pin must win.
        self._verify = True
        self._session.headers.update({"X-API-Key": api_key, "User-Agent": "vla-appliance-client/0.1"})
        if pin_sha256:
            fingerprint = pin_sha256.replace(":", "").lower()
            if len(fingerprint) != 64:
                raise ValueError("pin_sha256 is the certificate's SHA-256: 64 hex digits (colons allowed)")
            self._session.mount("https://", _PinnedAdapter(fingerprint))
            self._verify = False
        elif ca_file:
            self._verify = ca_file

    def close(self):
        self._session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _request(self, method, path, **kwargs):
        waited = 0.0
        for attempt in range(self.retries + 1):
            try:
                response = self._session.request(method, self.url + path, timeout=self.timeout_s,
                                                 verify=self._verify, **kwargs)
            except requests.exceptions.RequestException as e:
                raise errors.ConnectionFailed(str(e)) from e
            if response.status_code < 400:
                return response
            retry_after = _retry_after(response)
            try:
                body = response.json()
            except ValueError:
                body = {"error": response.text[:500]}
            error = errors.from_answer(response.status_code, body, retry_after)
            retryable = response.status_code in _RETRYABLE and retry_after is not None
            if not retryable or attempt == self.retries or waited + retry_after > self.max_retry_wait_s:
                raise error
            time.sleep(retry_after)
            waited += retry_after
        raise AssertionError("unreachable")

    def models(self):
        """`GET /v1/models`: what the appliance serves (cameras, state dim, horizon, dof, ...)."""
        return self._request("GET", "/v1/models").json()

    def health(self):
        return self._request("GET", "/health").json()

    def infer(self, images, instruction, state, deadline_ms=None, priority=None, model=None, extra=None,
              seed=None):
        """One decision: `images` by camera name (uint8 `[H, W, 3]`/`[3, H, W]` arrays or JPEG/PNG
        bytes; a single frame for a one-camera model), the instruction, the joint state. Returns
        a `Result` with the actions as NumPy; raises the typed error of the code otherwise."""
        body = {"robot_id": self.robot_id, "instruction": instruction,
                "state": [float(x) for x in np.asarray(state, dtype=np.float64).reshape(-1)]}
        if isinstance(images, dict):
            body["images"] = {name: _frame(name, frame) for name, frame in images.items()}
        elif isinstance(images, (bytes, bytearray, memoryview)):
            body["image"] = _frame("image", images)
        else:
            body["images"] = {"image": _frame("image", images)}
        model = model or self.model
        if model:
            body["model"] = model
        if deadline_ms is not None:
            body["deadline_ms"] = int(deadline_ms)
        if priority is not None:
            body["priority"] = priority
        if extra:
            body["extra"] = {k: np.asarray(v).tolist() for k, v in extra.items()}
        if seed is not None:
            body["seed"] = int(seed)
        response = self._request("POST", "/v1/inference", json=body)
        answer = response.json()
        actions = np.asarray(answer.get("actions") or [answer["action"]], dtype=np.float32)
        rate_limit = {k.lower(): v for k, v in response.headers.items() if k.lower().startswith("ratelimit")}
        return Result(
            actions=actions,
            timing=answer.get("timing", {}),
            policy=answer.get("policy", {}),
            model=answer.get("model"),
            model_version=answer.get("model_version"),
            request_id=answer.get("request_id"),
            dt_ms=answer.get("dt_ms"),
            seed=answer.get("seed"),
            outputs={k: np.asarray(v) for k, v in answer.get("outputs", {}).items()},
            rate_limit=rate_limit,
        )

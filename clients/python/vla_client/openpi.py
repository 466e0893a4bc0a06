"""An openpi-style policy over the appliance's HTTPS endpoint.

Code written against openpi's `BasePolicy.infer(obs) -> {"actions": ...}` (for example a LIBERO
or ALOHA evaluation loop) can point at the appliance unchanged:

    policy = OpenpiPolicy(Client(url, robot_id="arm-1", api_key=KEY, ca_file="ca.pem"))
    actions = policy.infer({"observation/image": img, "observation/state": s, "prompt": "..."})["actions"]

Observation keys map to the model's cameras, state and prompt as the appliance's own openpi
endpoint maps them by default (`observation/image` → the first camera,
`observation/wrist_image` → the second, `observation/<camera>_image` → others,
`observation/state`, `prompt`; nested dicts are flattened with `/`); pass `cameras=` to map
others, and `extras={"observation/goal": "goal"}` for the model's extra inputs.
"""

import numpy as np

try:  # openpi-client's base class, when it is installed; the adapter works without it.
    from openpi_client.base_policy import BasePolicy
except ImportError:  # pragma: no cover - depends on the environment
    class BasePolicy:  # noqa: D101
        def reset(self):
            pass


def _flatten(obs, prefix=""):
    """`{"observation": {"image": x}}` as `{"observation/image": x}`, as openpi flattens it."""
    flat = {}
    for key, value in obs.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class OpenpiPolicy(BasePolicy):
    def __init__(self, client, cameras=None, state_key="observation/state", prompt_key="prompt", model=None,
                 extras=None):
        self._client = client
        self._extras = extras or {}
        self._model = model
        self._state_key = state_key
        self._prompt_key = prompt_key
        self._cameras = cameras
        self._metadata = None

    def _camera_map(self):
        if self._cameras is None:
            served = self._client.models()
            models = served["models"]
            wanted = self._model or self._client.model or served.get("default_model")
            model = next((m for m in models if m.get("name") == wanted), models[0])
            self._metadata = model
            names = model.get("cameras", [])
            keys = ["observation/image", "observation/wrist_image"]
            self._cameras = {
                (keys[i] if i < len(keys) else f"observation/{name}_image"): name for i, name in enumerate(names)
            }
        return self._cameras

    def infer(self, obs):
        obs = _flatten(obs)
        cameras = self._camera_map()
        images = {camera: obs[key] for key, camera in cameras.items() if key in obs}
        result = self._client.infer(
            images=images,
            instruction=str(obs.get(self._prompt_key, "")),
            state=np.asarray(obs[self._state_key], dtype=np.float32),
            model=self._model,
            extra={name: obs[key] for key, name in self._extras.items() if key in obs},
        )
        return {"actions": result.actions, "server_timing": result.timing, "policy": result.policy}

    def reset(self):
        pass

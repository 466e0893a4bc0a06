"""The client against a running appliance (started by appliance/tests/python_client.rs).

Environment: VLA_URL, VLA_CA (the appliance's certificate), VLA_FINGERPRINT (its SHA-256),
VLA_ROBOT and VLA_KEY (a robot), VLA_SPENT_ROBOT and VLA_SPENT_KEY (a robot whose day quota
is 0), VLA_REFERENCE (tiny-pi's reference.json: observations and PyTorch's actions).
Run: python -m unittest discover -s clients/python/tests
"""

import base64
import json
import os
import time
import unittest

import numpy as np

from vla_client import Client, OpenpiPolicy, errors

ENV = os.environ
URL, CA, ROBOT, KEY = ENV["VLA_URL"], ENV["VLA_CA"], ENV["VLA_ROBOT"], ENV["VLA_KEY"]
CASE = json.load(open(ENV["VLA_REFERENCE"]))["cases"][0]
ROW = CASE["requests"][0]
WANT = np.array(CASE["outputs"][0]["actions"], dtype=np.float64).reshape(50, 14)


def frame(camera):
    return np.frombuffer(base64.b64decode(ROW["images"][camera]["data"]), dtype=np.uint8).reshape(224, 224, 3)


def tiny_pi(client, **kwargs):
    return client.infer(
        images={"base": frame("base"), "wrist": frame("wrist")},
        instruction=ROW["instruction"],
        state=ROW["state"],
        extra=ROW.get("extra"),
        seed=ROW["seed"],
        model="tiny-pi",
        **kwargs,
    )


class Inference(unittest.TestCase):
    def test_actions_equal_pytorchs(self):
        with Client(URL, robot_id=ROBOT, api_key=KEY, ca_file=CA) as client:
            result = tiny_pi(client, deadline_ms=5000, priority="high")
            self.assertEqual(result.actions.shape, (50, 14))
            self.assertEqual(result.actions.dtype, np.float32)
            self.assertLess(float(np.abs(result.actions - WANT).max()), 1e-4)
            self.assertEqual(result.model, "tiny-pi")
            self.assertEqual(result.seed, ROW["seed"])
            self.assertEqual(result.policy["decision"], "allow")
            self.assertIn("inference_ms", result.timing)
            self.assertTrue(result.rate_limit, "RateLimit headers of the quota")
            np.testing.assert_array_equal(result.action, result.actions[0])

    def test_frames_as_chw_and_as_png_bytes(self):
        import zlib, struct

        def png(pixels):
            h, w, _ = pixels.shape
            raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))
            chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
            return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                    + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))

        with Client(URL, robot_id=ROBOT, api_key=KEY, ca_file=CA) as client:
            hwc = tiny_pi(client).actions
            chw = client.infer(
                images={"base": np.transpose(frame("base"), (2, 0, 1)), "wrist": png(frame("wrist"))},
                instruction=ROW["instruction"], state=ROW["state"], extra=ROW.get("extra"), seed=ROW["seed"],
                model="tiny-pi",
            ).actions
            np.testing.assert_allclose(chw, hwc, atol=1e-5)

    def test_connection_is_reused(self):
        with Client(URL, robot_id=ROBOT, api_key=KEY, ca_file=CA) as client:
            tiny_pi(client)
            pool = client._session.get_adapter(URL).poolmanager
            before = sum(p.num_connections for p in pool.pools._container.values())
            for _ in range(5):
                tiny_pi(client)
            after = sum(p.num_connections for p in pool.pools._container.values())
            self.assertEqual(before, after, "each call opened a new connection")

    def test_pinned_certificate(self):
        with Client(URL, robot_id=ROBOT, api_key=KEY, pin_sha256=ENV["VLA_FINGERPRINT"]) as client:
            self.assertEqual(tiny_pi(client).actions.shape, (50, 14))
        wrong = "00" * 32
        with Client(URL, robot_id=ROBOT, api_key=KEY, pin_sha256=wrong) as client:
            with self.assertRaises(errors.ConnectionFailed):
                tiny_pi(client)
        with self.assertRaises(ValueError):
            Client(URL, robot_id=ROBOT, api_key=KEY, pin_sha256="abc")

    def test_unverified_tls_is_refused(self):
        # No CA file and no pin: the system's trust store, which does not know the appliance.
        with Client(URL, robot_id=ROBOT, api_key=KEY) as client:
            with self.assertRaises(errors.ConnectionFailed):
                tiny_pi(client)


class Errors(unittest.TestCase):
    def test_each_code_has_its_class(self):
        with Client(URL, robot_id=ROBOT, api_key=KEY, ca_file=CA) as client:
            with self.assertRaises(errors.StateLengthMismatch) as caught:
                client.infer(images={"base": frame("base"), "wrist": frame("wrist")}, instruction="x",
                             state=[0.0] * 3, model="tiny-pi", extra=ROW.get("extra"))
            self.assertIsInstance(caught.exception, errors.InvalidRequest)
            self.assertEqual(caught.exception.status, 422)
            self.assertEqual(caught.exception.code, "state_length_mismatch")
            self.assertIn("state", caught.exception.message)
            with self.assertRaises(errors.ModelNotFound) as caught:
                client.infer(images={"base": frame("base")}, instruction="x", state=ROW["state"], model="nope")
            self.assertIsInstance(caught.exception, errors.NotFound)
        with Client(URL, robot_id=ROBOT, api_key="not-a-key", ca_file=CA) as client:
            with self.assertRaises(errors.Unauthorized):
                tiny_pi(client)

    def test_retry_after_is_honoured_within_its_bound(self):
        spent = Client(URL, robot_id=ENV["VLA_SPENT_ROBOT"], api_key=ENV["VLA_SPENT_KEY"], ca_file=CA,
                       retries=3, max_retry_wait_s=1.0)
        started = time.monotonic()
        with self.assertRaises(errors.RateLimited) as caught:
            tiny_pi(spent)
        # The day quota's Retry-After is hours away: beyond the bound, so no waiting at all.
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(caught.exception.code, "rate_limited")
        self.assertGreater(caught.exception.retry_after, 1.0)
        spent.close()

    def test_a_429_with_a_short_retry_after_is_retried(self):
        # Two robots' worth of in-flight requests are not needed: the per-second rate limit of
        # the shipped rate-limit policy refuses the second call within a second with a short
        # Retry-After, and the client waits it out and succeeds.
        with Client(URL, robot_id=ENV["VLA_SLOW_ROBOT"], api_key=ENV["VLA_SLOW_KEY"], ca_file=CA,
                    retries=2, max_retry_wait_s=3.0) as client:
            tiny_pi(client)
            started = time.monotonic()
            tiny_pi(client)
            self.assertGreater(time.monotonic() - started, 0.5, "the second call was not refused and retried")
        with Client(URL, robot_id=ENV["VLA_SLOW_ROBOT"], api_key=ENV["VLA_SLOW_KEY"], ca_file=CA,
                    retries=0) as client:
            with self.assertRaises(errors.RateLimited):
                tiny_pi(client)
                tiny_pi(client)


class Openpi(unittest.TestCase):
    def test_openpi_style_policy(self):
        from openpi_client.base_policy import BasePolicy

        with Client(URL, robot_id=ROBOT, api_key=KEY, ca_file=CA, model="tiny-pi") as client:
            policy = OpenpiPolicy(client, extras={"observation/goal": "goal"})
            self.assertIsInstance(policy, BasePolicy)
            obs = {
                "observation": {"image": frame("base"), "wrist_image": frame("wrist"),
                                "state": np.asarray(ROW["state"], dtype=np.float32)},
                "prompt": ROW["instruction"],
            }
            for name, value in (ROW.get("extra") or {}).items():
                obs["observation"][name] = np.asarray(value, dtype=np.float32)
            out = policy.infer(obs)
            self.assertEqual(out["actions"].shape, (50, 14))
            # No seed: the noise differs from the reference's, the shape and the chain do not.
            self.assertIn("inference_ms", out["server_timing"])
            self.assertEqual(out["policy"]["decision"], "allow")


if __name__ == "__main__":
    unittest.main()

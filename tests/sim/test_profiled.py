"""The profiled latency model: the profile format, validation, the least-squares fit, the packaged profile."""

import json
import random

import pytest

from shunter.cli import main
from shunter.engine import ScheduledRequest, SchedulerOutput
from shunter.request import Request
from shunter.sim.latency import build_latency_model
from shunter.sim.profiled import (
    FEATURES, Profile, ProfiledLatency, ProfileStep, fit_coefficients, packaged_profile,
)

TRUE = {"intercept": 4e-3, "prefill_tokens": 2.5e-5, "prefill_attention_pairs": 3e-9, "prefill_chunks": 1e-3,
        "prefill_cached_tokens": 4e-6, "num_decodes": 2e-4, "sum_decode_context": 1.5e-7}
METADATA = {"hardware": "cpu", "model": "smollm2-135m", "dtype": "float32", "threads": 2, "block_size": 16,
            "num_blocks": 512}


def synthetic_profile(noise: float = 0.0, seed: int = 0, n: int = 200) -> Profile:
    rng = random.Random(seed)
    truth = ProfiledLatency(TRUE)
    steps = []
    for _ in range(n):
        prefill = []
        for _ in range(rng.choice([0, 0, 1, 2])):
            new = rng.randint(1, 512)
            prefill.append((new, new + rng.choice([0, 0, rng.randint(1, 2000)])))
        decodes = rng.randint(0 if prefill else 1, 32)
        context = sum(rng.randint(1, 3000) for _ in range(decodes))
        seconds = truth.step_time(prefill, decodes, context) * (1 + rng.gauss(0, noise))
        steps.append(ProfileStep(prefill, decodes, context, seconds))
    return Profile(dict(METADATA), steps)


def test_fit_recovers_known_coefficients_exactly_without_noise():
    fitted = fit_coefficients(synthetic_profile().steps)
    for name in FEATURES:
        assert fitted[name] == pytest.approx(TRUE[name], rel=1e-6)


def test_fit_is_close_with_noise_and_predicts_well():
    profile = synthetic_profile(noise=0.03, seed=1, n=400)
    model = ProfiledLatency.from_profile(profile)
    for name in ("intercept", "prefill_tokens", "num_decodes"):
        assert model.coefficients[name] == pytest.approx(TRUE[name], rel=0.15)
    assert model.fit_error < 0.05
    assert all(v >= 0 for v in model.coefficients.values())


def test_a_feature_never_exercised_gets_zero():
    steps = [ProfileStep([], d, d * 100, 1e-3 + 1e-4 * d) for d in range(1, 20)]  # decode-only profile
    fitted = fit_coefficients(steps)
    assert all(fitted[name] == 0 for name in FEATURES if name.startswith("prefill"))
    assert fitted["num_decodes"] + fitted["sum_decode_context"] * 100 == pytest.approx(1e-4, rel=1e-6)


def test_round_trip_through_a_file_and_the_registry(tmp_path):
    path = tmp_path / "profile.json"
    synthetic_profile().save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "shunter-profile" and data["version"] == 1 and data["metadata"] == METADATA
    assert set(data["steps"][0]) == {"prefill", "num_decodes", "sum_decode_context", "seconds"}
    model = build_latency_model("profiled", profile=str(path))
    assert model.coefficients["num_decodes"] == pytest.approx(TRUE["num_decodes"], rel=1e-6)
    assert model.kv_capacity_blocks(16, 2048) == 512
    assert model.kv_capacity_blocks(32, 2048) == 256  # same tokens, bigger blocks
    assert model.decode_time(3, 300) == model.step_time([], 3, 300)


def test_profile_step_from_a_real_batch():
    prefill = Request("p", list(range(300)))
    decode = Request("d", list(range(40)), output_token_ids=[7])
    batch = SchedulerOutput([ScheduledRequest(prefill, 128, 64, [], False), ScheduledRequest(decode, 1, 40, [], True)])
    step = ProfileStep.from_batch(batch, 0.02)
    assert step.prefill == [(128, 192)] and step.num_decodes == 1 and step.sum_decode_context == 41


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format="other"), "not a Shunter profile"),
    (lambda d: d.update(version=2), "version"),
    (lambda d: d["metadata"].pop("block_size"), "lacks block_size"),
    (lambda d: d.update(steps=[]), "non-empty"),
    (lambda d: d["steps"].__setitem__(0, {"prefill": [[5, 2]], "seconds": 0.1}), "num_new_tokens <= context_len"),
    (lambda d: d["steps"].__setitem__(0, {"num_decodes": 1, "sum_decode_context": 4, "seconds": -1}), "positive"),
    (lambda d: d["steps"].__setitem__(0, {"seconds": 0.1}), "empty step"),
    (lambda d: d["steps"].__setitem__(0, {"num_decodes": 1}), "expected"),
])
def test_bad_profiles_are_rejected_with_a_clear_message(tmp_path, mutate, message):
    data = synthetic_profile(n=5).to_json()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        Profile.load(path)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Profile.load(tmp_path / "none.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Profile.load(tmp_path / "x.json")


def test_degenerate_fit_is_refused():
    with pytest.raises(ValueError, match="zero time"):
        ProfiledLatency({name: 0.0 for name in FEATURES})


def test_packaged_profile_is_the_default_for_cpu_smollm2():
    path = packaged_profile("cpu", "smollm2-135m")
    assert path is not None and path.endswith("cpu-smollm2-135m.json")
    assert packaged_profile("a100-80gb", "llama-2-7b") is None
    model = build_latency_model("profiled", hardware="cpu", model="smollm2-135m")
    meta = model.metadata
    assert (meta["hardware"], meta["model"], meta["block_size"]) == ("cpu", "smollm2-135m", 16)
    assert "schedule + execute + update" in meta["seconds"]
    # A decode step of the built-in model on a CPU takes milliseconds, a 512-token prefill far more.
    decode = model.step_time((), 8, 8 * 256)
    prefill = model.step_time([(512, 512)], 0, 0)
    assert 1e-3 < decode < prefill < 10
    with pytest.raises(ValueError, match="--profile PATH"):
        build_latency_model("profiled", hardware="a100-80gb", model="llama-2-7b")


def test_simulate_with_the_packaged_profile(tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = ["simulate", "--latency-model", "profiled", "--hardware", "cpu", "--model", "smollm2-135m",
            "--trace", "sharegpt", "--max-requests", "30", "--rate", "1", "--quiet", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["completed"] == 30
    assert report["config"]["latency_model"]["metadata"]["hardware"] == "cpu"

"""The decorator registry behind policies, latency models and catalogs."""

import pytest

from shunter.cli import main
from shunter.cluster.policies import DISPATCH
from shunter.registry import Registry
from shunter.sim.hardware import HARDWARE
from shunter.sim.latency import LATENCY_MODELS
from shunter.sim.models import MODELS


def test_register_get_names_in_order():
    reg = Registry("widget")

    @reg.register("b-thing")
    def b():
        return "b"

    reg.register("a-thing", "a")
    assert reg.get("b-thing") is b
    assert reg.get("a-thing") == "a"
    assert reg.names() == ["b-thing", "a-thing"]
    assert "a-thing" in reg and "c" not in reg
    assert len(reg) == 2


def test_unknown_name_is_one_line_listing_valid_names():
    reg = Registry("widget")
    reg.register("one", 1)
    reg.register("two", 2)
    with pytest.raises(ValueError) as e:
        reg.get("three")
    assert str(e.value) == "unknown widget 'three'; choose from: one, two"
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["Upper", "under_score", "with space", ""])
def test_names_are_lower_case_hyphenated(name):
    with pytest.raises(ValueError):
        Registry("widget").register(name, 1)


def test_duplicate_registration_fails():
    reg = Registry("widget")
    reg.register("x", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("x", 2)


def test_decorator_returns_the_function_and_a_refused_one_changes_nothing():
    reg = Registry("widget")

    @reg.register("first")
    def first():
        return 1

    assert first() == 1 and reg.get("first") is first  # the module keeps a plain function
    with pytest.raises(ValueError, match="already registered"):
        @reg.register("first")
        def impostor():
            return 2

    assert reg.get("first") is first and reg.items() == [("first", first)]


def test_unhashable_name_is_the_same_one_line_error():
    reg = Registry("widget")
    reg.register("one", 1)
    with pytest.raises(ValueError, match=r"^unknown widget \['one'\]; choose from: one$"):
        reg.get(["one"])


def test_the_cli_lists_a_newly_registered_policy(monkeypatch, capsys):
    # Adding a policy is one function and one decorator line: `--list` reads the registry, not a list of its own.
    monkeypatch.setattr(DISPATCH, "_entries", dict(DISPATCH._entries))  # registered for this test only
    DISPATCH.register("test-only-policy", lambda reports, request, ctx: 0)
    assert main(["simulate", "--list"]) == 0
    dispatch_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("dispatch:"))
    assert dispatch_line.split(":", 1)[1].split(", ")[-1].strip() == "test-only-policy"


def test_project_registries_hold_the_required_names():
    assert {"round-robin", "random", "least-requests", "queue", "infaas", "llumnix", "power-of-two", "prefix",
            "slo"} <= set(DISPATCH.names())
    assert DISPATCH.canonical("rr") == "round-robin" and DISPATCH.canonical("least-load") == "infaas"
    assert {"roofline", "profiled"} <= set(LATENCY_MODELS.names())
    assert {"a10", "l4", "l40s", "a40", "a100-40gb", "a100-80gb", "h100", "h200"} <= set(HARDWARE.names())
    assert {"llama-2-7b", "llama-2-13b", "llama-3-8b", "llama-2-70b", "qwen2.5-7b", "smollm2-135m"} <= set(MODELS.names())
    for reg in (DISPATCH, LATENCY_MODELS, HARDWARE, MODELS):
        with pytest.raises(ValueError, match="choose from"):
            reg.get("no-such-name")

"""The serving configuration and the per-request arguments, checked without an engine."""
import math

import pytest

from m2iv.vllm.config import (ServingConfigError, SteeringRequestError, cache_salt, parse_config,
                              parse_request)


@pytest.fixture(scope="module")
def cfg(workdir, vectors):
    return parse_config({"m2iv": {"vectors": {"a": str(workdir / "llama-a.safetensors"),
                                              "bank": str(workdir / "llama-bank.safetensors")}}})


def test_no_entry_means_inert():
    assert parse_config({}) is None and parse_config(None) is None
    assert parse_config({"other_plugin": {}}) is None


def test_names_and_slots(cfg):
    assert cfg.names == ("a", "bank/0", "bank/1", "bank/2")  # a bank file serves its rows
    assert cfg.bank_size == 5 and cfg.slot("a") == 1 and cfg.slot("bank/2") == 4
    assert cfg.prefix_caching == "salt" and cfg.backend == "auto"


@pytest.mark.parametrize("raw,match", [
    ({"m2iv": []}, "must be a dict"),
    ({"m2iv": {"vectors": {}}}, "must map names to files"),
    ({"m2iv": {"vectors": {"a": "/no/such.safetensors"}}}, "'a': no file at"),
    ({"m2iv": {"vectors": {"a/b": "x"}}}, "without '/'"),
    ({"m2iv": {"vectors": {"a": 3}}}, "expected a file path or"),
    ({"m2iv": {"vectors": {"a": "x"}, "prefix": "salt"}}, r"unknown key\(s\) \['prefix'\]"),
    ({"m2iv": {"vectors": {"a": {"library": "a"}}, "prefix_caching": "on"}}, "must be one of"),
    ({"m2iv": {"vectors": {"a": {"library": "a"}}, "backend": "cuda"}}, "backend"),
])
def test_bad_config(raw, match):
    with pytest.raises(ServingConfigError, match=match):
        parse_config(raw)


def test_request_forms(cfg):
    assert not parse_request(None, cfg).active
    assert not parse_request({"other": 1}, cfg).active
    assert not parse_request({"m2iv": None}, cfg).active
    assert not parse_request({"m2iv": {"vectors": "a", "strength": 0}}, cfg).active
    s = parse_request({"m2iv": {"vectors": "bank/1", "strength": -2}}, cfg)
    assert (s.slot, s.strength, s.name) == (3, -2.0, "bank/1")
    assert parse_request({"m2iv": "a"}, cfg).strength == 1.0
    flat = parse_request({"m2iv": "a", "m2iv_strength": 0.5}, cfg)  # the server's vllm_xargs
    assert (flat.slot, flat.strength) == (1, 0.5)


@pytest.mark.parametrize("extra,match", [
    ({"m2iv": {"vectors": "b"}}, "'b' is not served here; this server has 'a', 'bank/0'"),
    ({"m2iv": {"vectors": "a", "strength": math.inf}}, "must be finite"),
    ({"m2iv": {"vectors": "a", "strength": None}}, "must be a number"),
    ({"m2iv": {"vectors": 1}}, "is not served here"),
    ({"m2iv": 3}, "must be"),
    ({"m2iv_strength": 2.0}, "goes with a vectors name"),
    ({"m2iv": "a", "m2iv_strength": "x"}, "must be a number"),
])
def test_bad_request(cfg, extra, match):
    with pytest.raises(SteeringRequestError, match=match):
        parse_request(extra, cfg)


def test_cache_salt(cfg, workdir):
    a1 = parse_request({"m2iv": "a"}, cfg)
    a2 = parse_request({"m2iv": "a", "m2iv_strength": 2}, cfg)
    b = parse_request({"m2iv": "bank/0"}, cfg)
    none = parse_request(None, cfg)
    assert cache_salt(none, cfg, None, "r1") is None
    assert cache_salt(none, cfg, "user", "r1") == "user"
    salt = cache_salt(a1, cfg, None, "r1")
    assert salt == cache_salt(a1, cfg, None, "r2")  # same steering: shared
    assert len({salt, cache_salt(a2, cfg, None, "r1"), cache_salt(b, cfg, None, "r1")}) == 3
    assert cache_salt(a1, cfg, "user", "r1").startswith("user|m2iv:")
    off = parse_config({"m2iv": {"vectors": {"a": str(workdir / "llama-a.safetensors")},
                                 "prefix_caching": "off"}})
    assert cache_salt(a1, off, None, "r1") != cache_salt(a1, off, None, "r2")  # never shared
